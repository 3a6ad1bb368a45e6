// CUDA kernels of metamask_fast::add_scaled_, add_scaled and virtual_sgd_step: element-wise ops over lists
// of tensors (the math is that of the fallbacks in metamask_fast/ops.py).
//
//   add_scaled_(tensors, others, alpha)   tensors[i] += alpha * others[i], in place
//   add_scaled(tensors, others, alpha)    new tensors tensors[i] + alpha * others[i]
//   add_scaled.out(..., out)              the same into out[i]
//   virtual_sgd_step(params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov)
//       new tensors θ' = θ - lr * upd, the step of torch.optim.SGD without touching params or buffers:
//       d = g + wd θ; with momentum, b' = (no buffer) ? d : momentum b + (1 - dampening) d and
//       upd = nesterov ? d + momentum b' : b'; without momentum, upd = d.
//
// Launch design (multi-tensor apply): every tensor is cut into chunks of kChunk elements and each block
// handles one chunk. The tensor list's metadata (per tensor: one pointer per operand list and the size; per
// block: which tensor and which chunk) travels BY VALUE as the kernel's argument, a struct of fixed capacity
// (kMaxBlocks blocks, max_tensors(depth) tensors, under the 4 KiB kernel-parameter limit), so no host-to-device
// copy is needed. The host loop fills the struct and launches whenever it is full; a tensor split across
// launches continues in the next one. A ResNet-18 (62 tensors, 11.7M values, 405 chunks) or ~80 tensors of
// 14M values (~480 chunks) take 2 launches per call, whatever the op.
// Within a block, threads move 4 elements at a time with vector loads/stores when every operand of the chunk
// is aligned to 4 elements, or 16 bytes for float64 (always so for tensors at the start of an allocation,
// whose chunks are whole numbers of vectors); otherwise, and for the last < 4 elements of a chunk, they
// fall back to scalar accesses. Empty tensors launch nothing.
//
// Precision: arithmetic in at::opmath_type, float32 for float16/bfloat16/float32 and float64 for float64;
// each result is rounded once to the tensors' dtype. No fused multiply-add (setup.py builds with
// --fmad=false): every product and sum is rounded as in the CPU kernels, which these match bitwise.
// Inputs must be contiguous (checked), on one CUDA device.

// Per-operator headers instead of ATen/ATen.h: they compile much faster.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE headers.
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../tensor_list_checks.h"
#include "multi_tensor_apply.cuh"

namespace metamask_fast {
namespace {

// Each op reads operand lists 0 .. kIn - 1 and writes list kOut (of kDepth); `present` has bit k set when list
// k has a tensor for the current chunk (an absent input reads as 0).
template <typename acc_t, int depth, int out>
struct AddScaledOp {
  static constexpr int kDepth = depth;
  static constexpr int kIn = 2;
  static constexpr int kOut = out;
  acc_t alpha;
  __device__ acc_t operator()(const acc_t (&v)[kIn], unsigned /*present*/) const {
    return v[0] + alpha * v[1];
  }
};

// Operands: 0 params, 1 grads, 2 momentum buffers (absent: none yet, or momentum 0), 3 output.
template <typename acc_t>
struct SgdOp {
  static constexpr int kDepth = 4;
  static constexpr int kIn = 3;
  static constexpr int kOut = 3;
  acc_t lr, momentum, one_minus_dampening, weight_decay;
  // Decided on the host from the float64 arguments, as torch.optim.SGD does (a tiny wd or momentum that
  // rounds to 0 in float32 still enables its term).
  bool use_weight_decay, use_momentum, nesterov;
  __device__ acc_t operator()(const acc_t (&v)[kIn], unsigned present) const {
    acc_t d = v[1];
    if (use_weight_decay) {
      d += weight_decay * v[0];
    }
    acc_t update = d;
    if (use_momentum) {
      const acc_t buffer = (present & (1u << 2)) ? momentum * v[2] + one_minus_dampening * d : d;
      update = nesterov ? d + momentum * buffer : buffer;
    }
    return v[0] - lr * update;
  }
};

// tensors[i] + alpha * others[i] into outs[i], separate tensors: add_scaled and add_scaled.out.
void launch_add_scaled(at::TensorList outs, at::TensorList tensors, at::TensorList others, double alpha) {
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  std::vector<std::array<void*, 3>> ptrs;
  std::vector<int64_t> numel;
  for (const auto i : c10::irange(tensors.size())) {
    ptrs.push_back({const_cast<void*>(tensors[i].const_data_ptr()), const_cast<void*>(others[i].const_data_ptr()),
                    outs[i].mutable_data_ptr()});
    numel.push_back(tensors[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "add_scaled_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_tensor_apply<scalar_t>(ptrs, numel, AddScaledOp<acc_t, 3, 2>{static_cast<acc_t>(alpha)});
  });
}

void add_scaled__cuda(at::TensorList tensors, at::TensorList others, double alpha) {
  check_add_scaled("add_scaled_", tensors, others);
  check_cuda("add_scaled_", "tensors", tensors);
  check_add_scaled_in_place_aliasing("add_scaled_", tensors, others);
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  std::vector<std::array<void*, 2>> ptrs;
  std::vector<int64_t> numel;
  for (const auto i : c10::irange(tensors.size())) {
    ptrs.push_back({tensors[i].mutable_data_ptr(), const_cast<void*>(others[i].const_data_ptr())});
    numel.push_back(tensors[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "add_scaled__cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_tensor_apply<scalar_t>(ptrs, numel, AddScaledOp<acc_t, 2, 0>{static_cast<acc_t>(alpha)});
  });
}

std::vector<at::Tensor> add_scaled_cuda(at::TensorList tensors, at::TensorList others, double alpha) {
  check_add_scaled("add_scaled", tensors, others);
  check_cuda("add_scaled", "tensors", tensors);
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    out.push_back(at::empty_like(t));  // dense inputs: the same strides
  }
  launch_add_scaled(out, tensors, others, alpha);
  return out;
}

void add_scaled_out_cuda(at::TensorList tensors, at::TensorList others, double alpha, at::TensorList out) {
  check_add_scaled_out("add_scaled", tensors, others, out);
  check_cuda("add_scaled", "tensors", tensors);
  launch_add_scaled(out, tensors, others, alpha);
}

std::vector<at::Tensor> virtual_sgd_step_cuda(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov) {
  const std::vector<std::optional<at::Tensor>> buffer =
      check_virtual_sgd_step("virtual_sgd_step", params, grads, buffers);
  check_cuda("virtual_sgd_step", "params", params);

  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const bool use_momentum = momentum != 0;
  std::vector<at::Tensor> out;
  std::vector<std::array<void*, 4>> ptrs;
  std::vector<int64_t> numel;
  for (const auto i : c10::irange(params.size())) {
    out.push_back(at::empty_like(params[i]));
    // Without momentum the buffers do not enter the update, so they are not read.
    void* b = use_momentum && buffer[i].has_value() ? const_cast<void*>(buffer[i]->const_data_ptr()) : nullptr;
    ptrs.push_back({const_cast<void*>(params[i].const_data_ptr()), const_cast<void*>(grads[i].const_data_ptr()), b,
                    out.back().mutable_data_ptr()});
    numel.push_back(params[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_sgd_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SgdOp<acc_t> sgd{};
    sgd.lr = static_cast<acc_t>(lr);
    sgd.momentum = static_cast<acc_t>(momentum);
    sgd.one_minus_dampening = static_cast<acc_t>(1 - dampening);
    sgd.weight_decay = static_cast<acc_t>(weight_decay);
    sgd.use_weight_decay = weight_decay != 0;
    sgd.use_momentum = use_momentum;
    sgd.nesterov = nesterov;
    multi_tensor_apply<scalar_t>(ptrs, numel, sgd);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CUDA, m) {
  m.impl("add_scaled_", &add_scaled__cuda);
  m.impl("add_scaled", &add_scaled_cuda);
  m.impl("add_scaled.out", &add_scaled_out_cuda);
  m.impl("virtual_sgd_step", &virtual_sgd_step_cuda);
}

}  // namespace metamask_fast
