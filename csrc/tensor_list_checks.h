// Argument checks shared by the kernels of ops that take lists of tensors.
//
// Errors surface in Python as ValueError (bad values: empty list, mismatched devices or dtypes) or TypeError
// (unsupported dtype), and always name the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

namespace metamask_fast {

// `tensors` must be non-empty and hold tensors of one supported floating dtype on one device.
inline void check_tensor_list(const char* op, const char* arg, at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": `", arg, "` must be a non-empty list of tensors");
  const at::Tensor& first = tensors[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op, ": `",
      arg, "` must hold float32, float64, float16 or bfloat16 tensors, got ", dtype);
  for (const auto i : c10::irange(tensors.size())) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(
        t.scalar_type() == dtype, op, ": all of `", arg, "` must share one dtype, but ", arg, "[0] is ", dtype,
        " and ", arg, "[", i, "] is ", t.scalar_type());
    TORCH_CHECK_VALUE(
        t.device() == first.device(), op, ": all of `", arg, "` must be on one device, but ", arg, "[0] is on ",
        first.device(), " and ", arg, "[", i, "] is on ", t.device());
  }
}

// `tensors` must hold contiguous tensors: the kernels walk each tensor's memory as one flat array.
inline void check_contiguous(const char* op, const char* arg, at::TensorList tensors) {
  for (const auto i : c10::irange(tensors.size())) {
    TORCH_CHECK_VALUE(
        tensors[i].is_contiguous(), op, ": ", arg, "[", i, "] must be contiguous (its strides are ",
        tensors[i].strides(), "); call .contiguous() on it first");
  }
}

// `b` must be as long as `a`, and b[i] of the shape, dtype and device of a[i].
inline void check_pairwise_like(
    const char* op, const char* name_a, at::TensorList a, const char* name_b, at::TensorList b) {
  TORCH_CHECK_VALUE(
      a.size() == b.size(), op, ": `", name_a, "` and `", name_b, "` must be equally long, got ", a.size(),
      " and ", b.size());
  for (const auto i : c10::irange(a.size())) {
    TORCH_CHECK_VALUE(
        b[i].sizes() == a[i].sizes(), op, ": ", name_b, "[", i, "] must have the shape of ", name_a, "[", i,
        "], ", a[i].sizes(), ", got ", b[i].sizes());
    TORCH_CHECK_VALUE(
        b[i].scalar_type() == a[i].scalar_type() && b[i].device() == a[i].device(), op, ": ", name_b, "[", i,
        "] must have the dtype and device of ", name_a, "[", i, "] (", a[i].scalar_type(), ", ", a[i].device(),
        "), got ", b[i].scalar_type(), ", ", b[i].device());
  }
}

}  // namespace metamask_fast
