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

}  // namespace metamask_fast
