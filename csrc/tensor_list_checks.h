// Argument checks shared by the kernels of ops that take lists of tensors.
//
// Errors surface in Python as ValueError (bad values: empty list, mismatched devices or dtypes) or TypeError
// (unsupported dtype), and always name the op and the argument.
#pragma once

#include <ATen/MemoryOverlap.h>
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

// `tensors` must be dense (no gaps, no overlap: contiguous, channels_last or any other permutation of the
// dimensions): the kernels walk each tensor's memory as one flat array. Tensors walked together must also
// have the same strides (check_same_strides), so that the walk pairs up the same elements.
inline void check_dense(const char* op, const char* arg, at::TensorList tensors) {
  for (const auto i : c10::irange(tensors.size())) {
    TORCH_CHECK_VALUE(
        tensors[i].is_non_overlapping_and_dense(), op, ": ", arg, "[", i,
        "] must be contiguous (or dense in another memory format, such as channels_last); its strides are ",
        tensors[i].strides(), "; call .contiguous() on it first");
  }
}

// Whether two tensors of one shape order their elements the same way in memory: equal strides in every
// dimension of size > 1 (the stride of a size-1 dimension is arbitrary: a (4, 1, 3, 3) weight has the
// same memory order contiguous and channels_last, with different strides).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (const auto d : c10::irange(a.dim())) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// b[i] must be laid out like a[i] (after check_pairwise_like: the same shapes).
inline void check_same_strides(
    const char* op, const char* name_a, at::TensorList a, const char* name_b, at::TensorList b) {
  for (const auto i : c10::irange(a.size())) {
    TORCH_CHECK_VALUE(
        same_layout(a[i], b[i]), op, ": ", name_b, "[", i, "] must have the memory layout (strides) of ", name_a,
        "[", i, "], ", a[i].strides(), ", got ", b[i].strides());
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

// written[i] must not share memory with read[i], except, where `same_allowed`, by being the very same
// elements (an in-place update). Partial overlap would make the result depend on the order of the sweep.
inline void check_no_overlap(
    const char* op, const char* written_name, at::TensorList written, const char* read_name, at::TensorList read,
    bool same_allowed) {
  for (const auto i : c10::irange(written.size())) {
    const at::MemOverlapStatus status = at::get_overlap_status(written[i], read[i]);
    TORCH_CHECK_VALUE(
        status == at::MemOverlapStatus::No || (same_allowed && status == at::MemOverlapStatus::Full), op, ": ",
        written_name, "[", i, "] shares memory with ", read_name, "[", i, "]",
        same_allowed ? " without being the same tensor" : "", "; pass a separate tensor");
  }
}

// The arguments of add_scaled_ and add_scaled: dense lists, pairwise alike in shape, dtype, device and layout.
inline void check_add_scaled(const char* op, at::TensorList tensors, at::TensorList others) {
  check_tensor_list(op, "tensors", tensors);
  check_pairwise_like(op, "tensors", tensors, "others", others);
  check_dense(op, "tensors", tensors);
  check_same_strides(op, "tensors", tensors, "others", others);
}

// ... and of add_scaled.out: `out` like `tensors`, each out[i] either tensors[i] itself or separate memory.
inline void check_add_scaled_out(const char* op, at::TensorList tensors, at::TensorList others, at::TensorList out) {
  check_add_scaled(op, tensors, others);
  check_pairwise_like(op, "tensors", tensors, "out", out);
  check_same_strides(op, "tensors", tensors, "out", out);
  check_no_overlap(op, "out", out, "tensors", tensors, /*same_allowed=*/true);
  check_no_overlap(op, "out", out, "others", others, /*same_allowed=*/false);
}

}  // namespace metamask_fast
