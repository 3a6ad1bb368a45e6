// Argument checks shared by the kernels of ops that take lists of tensors.
//
// Errors surface in Python as ValueError (bad values: empty list, mismatched devices or dtypes) or TypeError
// (unsupported dtype), and always name the op and the argument.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

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

namespace detail {

// The bytes [begin, end) that a tensor can touch, and its index in its list.
struct ByteRange {
  uintptr_t begin;
  uintptr_t end;
  size_t index;
};

// The byte range of `t`, or false where it touches no memory (no elements, or no storage). Torch strides
// are never negative, so the last element sits at sum((size - 1) * stride) elements past the first.
inline bool byte_range(const at::Tensor& t, size_t index, ByteRange& range) {
  if (!t.defined() || t.numel() == 0) {
    return false;
  }
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  if (begin == 0) {
    return false;
  }
  int64_t span = 0;
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  for (const auto d : c10::irange(sizes.size())) {
    span += (sizes[d] - 1) * strides[d];
  }
  range = {begin, begin + static_cast<uintptr_t>((span + 1) * static_cast<int64_t>(t.element_size())), index};
  return true;
}

}  // namespace detail

// A list that an op reads, with its argument name.
struct NamedTensorList {
  const char* name;
  at::TensorList tensors;
};

// Aliasing across pairs (check_no_overlap covers each pair written[i], read[i]): no two tensors of `written`
// may share memory, and written[i] must not share memory with any read[j], j != i, of the lists `reads`
// (the kernels sweep all pairs at once, in parallel, so the result would depend on the order of the sweep).
// Reads may share memory with each other. Memory is compared by byte ranges, which is exact for the dense
// tensors that the kernels take. O(n log n): the written ranges, sorted, must be disjoint, and each read
// range is looked up among them. metamask_fast/ops.py's _check_no_cross_overlap is the same algorithm, so
// that both report the same pair.
inline void check_no_cross_overlap(
    const char* op, const char* written_name, at::TensorList written, std::initializer_list<NamedTensorList> reads) {
  std::vector<detail::ByteRange> ranges;
  ranges.reserve(written.size());
  for (const auto i : c10::irange(written.size())) {
    detail::ByteRange range{};
    if (detail::byte_range(written[i], i, range)) {
      ranges.push_back(range);
    }
  }
  std::sort(ranges.begin(), ranges.end(), [](const detail::ByteRange& a, const detail::ByteRange& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end != b.end ? a.end < b.end : a.index < b.index;
  });
  for (size_t k = 1; k < ranges.size(); ++k) {
    const detail::ByteRange& previous = ranges[k - 1];
    const detail::ByteRange& current = ranges[k];
    TORCH_CHECK_VALUE(
        current.begin >= previous.end, op, ": ", written_name, "[", std::min(previous.index, current.index),
        "] and ", written_name, "[", std::max(previous.index, current.index), "] share memory; pass separate tensors");
  }
  // The written ranges are now disjoint and sorted by begin, hence also by end.
  for (const NamedTensorList& read : reads) {
    for (const auto j : c10::irange(read.tensors.size())) {
      detail::ByteRange r{};
      if (!detail::byte_range(read.tensors[j], j, r)) {
        continue;
      }
      auto w = std::upper_bound(
          ranges.begin(), ranges.end(), r.begin,
          [](uintptr_t address, const detail::ByteRange& range) { return address < range.end; });
      for (; w != ranges.end() && w->begin < r.end; ++w) {
        TORCH_CHECK_VALUE(
            w->index == j, op, ": ", written_name, "[", w->index, "] shares memory with ", read.name, "[", j,
            "]; pass a separate tensor");
      }
    }
  }
}

// An optional tensor per ref tensor (the optimizers' state lists), each present one alike its ref in shape,
// dtype, device and layout. Returns the list with an undefined tensor counted as absent (nullopt), so that the
// kernels see only real ones.
inline std::vector<std::optional<at::Tensor>> check_optional_like(
    const char* op, const char* ref_name, at::TensorList ref, const char* name,
    const c10::List<std::optional<at::Tensor>>& tensors) {
  TORCH_CHECK_VALUE(
      tensors.size() == ref.size(), op, ": `", name, "` must be as long as `", ref_name, "` (None where absent), got ",
      tensors.size(), " and ", ref.size());
  std::vector<std::optional<at::Tensor>> present(tensors.size());
  for (const auto i : c10::irange(tensors.size())) {
    const std::optional<at::Tensor> b = tensors.get(i);
    if (!b.has_value() || !b->defined()) {
      continue;
    }
    const at::Tensor& p = ref[i];
    TORCH_CHECK_VALUE(
        b->sizes() == p.sizes(), op, ": ", name, "[", i, "] must have the shape of ", ref_name, "[", i, "], ",
        p.sizes(), ", got ", b->sizes());
    TORCH_CHECK_VALUE(
        b->scalar_type() == p.scalar_type() && b->device() == p.device(), op, ": ", name, "[", i,
        "] must have the dtype and device of ", ref_name, "[", i, "] (", p.scalar_type(), ", ", p.device(), "), got ",
        b->scalar_type(), ", ", b->device());
    TORCH_CHECK_VALUE(
        same_layout(*b, p), op, ": ", name, "[", i, "] must have the memory layout (strides) of ", ref_name, "[", i,
        "], ", p.strides(), ", got ", b->strides());
    present[i] = *b;
  }
  return present;
}

// The arguments of virtual_sgd_step: dense params, grads laid out like them, and one optional momentum
// buffer per param, each present one alike its param. Returns the buffers (check_optional_like).
inline std::vector<std::optional<at::Tensor>> check_virtual_sgd_step(
    const char* op, at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers) {
  check_tensor_list(op, "params", params);
  check_pairwise_like(op, "params", params, "grads", grads);
  check_dense(op, "params", params);
  check_same_strides(op, "params", params, "grads", grads);
  return check_optional_like(op, "params", params, "buffers", buffers);
}

// An optional list as a list of tensors for the overlap checks (an absent one: an undefined tensor, which
// touches no memory).
inline std::vector<at::Tensor> as_tensors(const std::vector<std::optional<at::Tensor>>& tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    out.push_back(t.has_value() ? *t : at::Tensor());
  }
  return out;
}

// `out` of an optimizer op's .out overload: like `ref` (shape, dtype, device, layout), and new memory: no
// out[i] shares memory with any tensor of `reads` (the op's inputs, undefined tensors for absent ones) or with
// another out[j].
inline void check_separate_out(
    const char* op, const char* ref_name, at::TensorList ref, at::TensorList out,
    std::initializer_list<NamedTensorList> reads) {
  check_pairwise_like(op, ref_name, ref, "out", out);
  check_same_strides(op, ref_name, ref, "out", out);
  for (const NamedTensorList& read : reads) {
    for (const auto i : c10::irange(out.size())) {
      if (!read.tensors[i].defined()) {
        continue;
      }
      TORCH_CHECK_VALUE(
          at::get_overlap_status(out[i], read.tensors[i]) == at::MemOverlapStatus::No, op, ": out[", i,
          "] shares memory with ", read.name, "[", i, "]; pass a separate tensor");
    }
  }
  check_no_cross_overlap(op, "out", out, reads);
}

// Per-param step numbers of AdamW: as many as params, each >= 1.
inline void check_steps(const char* op, at::TensorList params, at::ArrayRef<double> steps) {
  TORCH_CHECK_VALUE(
      steps.size() == params.size(), op, ": `steps` must be as long as `params`, got ", steps.size(), " and ",
      params.size());
  for (const auto i : c10::irange(steps.size())) {
    TORCH_CHECK_VALUE(steps[i] >= 1, op, ": steps[", i, "] must be >= 1 (the number of the step made), got ", steps[i]);
  }
}

// AdamW's moments: both present or both absent for each param.
inline void check_moments_paired(
    const char* op, const std::vector<std::optional<at::Tensor>>& exp_avgs,
    const std::vector<std::optional<at::Tensor>>& exp_avg_sqs) {
  for (const auto i : c10::irange(exp_avgs.size())) {
    TORCH_CHECK_VALUE(
        exp_avgs[i].has_value() == exp_avg_sqs[i].has_value(), op, ": exp_avgs[", i, "] and exp_avg_sqs[", i,
        "] must both be tensors or both be None");
  }
}

// The arguments of add_scaled_ and add_scaled: dense lists, pairwise alike in shape, dtype, device and layout.
inline void check_add_scaled(const char* op, at::TensorList tensors, at::TensorList others) {
  check_tensor_list(op, "tensors", tensors);
  check_pairwise_like(op, "tensors", tensors, "others", others);
  check_dense(op, "tensors", tensors);
  check_same_strides(op, "tensors", tensors, "others", others);
}

// ... and of add_scaled.out: `out` like `tensors`, each out[i] either tensors[i] itself or memory of its own
// (shared with no other out[j], tensors[j] or others[j]).
inline void check_add_scaled_out(const char* op, at::TensorList tensors, at::TensorList others, at::TensorList out) {
  check_add_scaled(op, tensors, others);
  check_pairwise_like(op, "tensors", tensors, "out", out);
  check_same_strides(op, "tensors", tensors, "out", out);
  check_no_overlap(op, "out", out, "tensors", tensors, /*same_allowed=*/true);
  check_no_overlap(op, "out", out, "others", others, /*same_allowed=*/false);
  check_no_cross_overlap(op, "out", out, {{"tensors", tensors}, {"others", others}});
}

// ... and the aliasing rules of add_scaled_: tensors[i] may be others[i] itself, but shares no memory with
// anything else (for the CPU and CUDA kernels alike).
inline void check_add_scaled_in_place_aliasing(const char* op, at::TensorList tensors, at::TensorList others) {
  check_no_overlap(op, "tensors", tensors, "others", others, /*same_allowed=*/true);
  check_no_cross_overlap(op, "tensors", tensors, {{"others", others}});
}

}  // namespace metamask_fast
