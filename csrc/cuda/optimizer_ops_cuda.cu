// CUDA kernels of the optimizers' virtual updates and their vector-Jacobian products: metamask_fast::
// virtual_sgd_step.out, virtual_lars_step, virtual_adamw_step, sgd_vjp, lars_vjp, adamw_vjp (each also .out).
// The counterparts of optimizer_ops_cpu.cpp: the same registered functions and checks (optimizer_ops.h, with
// check_cuda as check_device), the same per-tensor scalars (optimizer_math.h, computed on the host in
// float64), and the arithmetic of the CPU loops (cpu_loops.inc), operation for operation:
//
//   virtual_sgd_step.out   θ' = θ - lr u, torch.optim.SGD's step (virtual_sgd_step: multi_tensor_ops_cuda.cu)
//   virtual_lars_step      d = q (g + wd θ) (g without decay: 1-d params under weight_decay_filter),
//                          μ' = momentum μ + d (d without a buffer), θ' = θ - lr μ'; q = eta ‖θ‖ / ‖g + wd θ‖
//                          (1 where both norms are not > 0, and for 1-d params under lars_adaptation_filter)
//   virtual_adamw_step     m, s the moments after g (torch's lerp for m); θ' = θ (1 - lr wd) + step_size m / D,
//                          D = sqrt(s) / sqrt(bias2) + eps, with the bias corrections of each tensor's step
//   sgd_vjp                u = f v, f = sgd_vjp_factor per tensor (it depends on whether a buffer exists)
//   lars_vjp               u = (v - d ⟨d, v⟩ / ‖d‖²) (-lr q) where the trust ratio applies, else u = -lr v
//   adamw_vjp              u = v ((1-β1) / D - m (1-β2) g / (bias2 σ D²)) step_size, σ = sqrt(s) / sqrt(bias2)
//
// Launch design: the multi-tensor apply of multi_tensor_apply.cuh (chunks of kChunk elements, one block per
// chunk, the tensor list's metadata by value as the kernel argument, no host-to-device copy). Per-tensor
// scalars that the host knows (SGD's VJP factor, AdamW's bias corrections per step number, LARS's per-tensor
// switches) travel by value beside each tensor's pointers (the op's TensorValues; static_asserts keep the
// arguments under the 4 KiB limit).
// LARS's trust ratio needs per-tensor sums first, Σθ², Σd² and, for the VJP, Σd·v, in float64, for the
// tensors that adapt only. They stay on the device, without a sync: (1) lars_sums_kernel, one block per
// chunk, writes each chunk's three partial sums (per thread, then a block reduction in a fixed tree order)
// to a float64 device buffer (at::empty, the caching allocator); (2) lars_combine_kernel, one thread per
// tensor (tensor, first chunk and chunk count by value, up to kCombineMax tensors per launch), adds its
// chunks' partials in chunk order and computes the tensor's row of scalars, q for the step or {projection
// applies, ⟨d, v⟩/‖d‖², -lr q} for the VJP, with the formulas of lars_trust_ratio / lars_vjp_scalars; (3) the
// element-wise kernel's op reads its tensor's row once per block (LarsStepOp::for_tensor). All launches go
// to the current stream, in order; no atomics, so repeated calls give identical results.
//
// Precision: arithmetic in at::opmath_type, float32 for float16/bfloat16/float32 and float64 for float64;
// each result is rounded once to the tensors' dtype. No fused multiply-add (setup.py builds with
// --fmad=false), IEEE division and square root: SGD, AdamW and their VJPs match the CPU kernels bitwise.
// LARS's sums add in another order than the CPU's (per thread, then per block), so its results may differ
// from the CPU's in the last bits of q; given the same sums, the scalars and the element-wise arithmetic
// are the CPU's. Inputs must be dense (checked), on one CUDA device.

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

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../optimizer_math.h"
#include "../optimizer_ops.h"
#include "../tensor_list_checks.h"
#include "multi_tensor_apply.cuh"

namespace metamask_fast {
namespace {

void* input(const at::Tensor& t) {
  return const_cast<void*>(t.const_data_ptr());
}

void* input_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? input(*t) : nullptr;
}

// The CUDA backend of optimizer_ops.h.
struct Cuda {};

void check_device(Cuda, const char* op, const char* arg, at::TensorList tensors) {
  check_cuda(op, arg, tensors);
}

std::vector<int64_t> numels(at::TensorList tensors) {
  std::vector<int64_t> numel;
  numel.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    numel.push_back(t.numel());
  }
  return numel;
}

// IEEE square root (sqrt.rn) in float32 or float64, as std::sqrt on the host.
template <typename acc_t>
__device__ __forceinline__ acc_t ieee_sqrt(acc_t x) {
  if constexpr (std::is_same<acc_t, float>::value) {
    return ::sqrtf(x);
  } else {
    return ::sqrt(x);
  }
}

// ------------------------------------------------------------------------------------------------ SGD

// cpu_loops.inc's sgd. Operands: 0 params, 1 grads, 2 momentum buffers (absent: none yet, or no momentum), 3 out.
template <typename acc_t>
struct SgdStepOp {
  static constexpr int kDepth = 4;
  static constexpr int kIn = 3;
  static constexpr int kOut = 3;
  acc_t weight_decay, momentum, keep, neg_lr;  // keep = 1 - dampening
  bool decay, use_momentum, nesterov;
  __device__ acc_t operator()(const acc_t (&v)[kIn], unsigned present) const {
    const acc_t t = v[0];
    acc_t d = v[1];
    if (decay) {
      d = d + weight_decay * t;
    }
    acc_t update = d;
    if (use_momentum) {
      acc_t moved = d;
      if (present & (1u << 2)) {
        moved = v[2] * momentum + keep * d;
      }
      update = nesterov ? d + momentum * moved : moved;
    }
    return t + neg_lr * update;
  }
};

void sgd_step_into(
    Cuda, at::TensorList out, at::TensorList params, at::TensorList grads,
    const std::vector<std::optional<at::Tensor>>& buffer, const SgdCoefficients& c) {
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const bool use_momentum = c.momentum != 0;
  std::vector<std::array<void*, 4>> ptrs;
  for (const auto i : c10::irange(params.size())) {
    // Without momentum the buffers do not enter the update, so they are not read (the CPU's kBuffer).
    ptrs.push_back({input(params[i]), input(grads[i]), use_momentum ? input_or_null(buffer[i]) : nullptr,
                    out[i].mutable_data_ptr()});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_sgd_step_out_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SgdStepOp<acc_t> sgd{};
    sgd.weight_decay = static_cast<acc_t>(c.weight_decay);
    sgd.momentum = static_cast<acc_t>(c.momentum);
    sgd.keep = static_cast<acc_t>(1 - c.dampening);
    sgd.neg_lr = static_cast<acc_t>(-c.lr);
    sgd.decay = c.weight_decay != 0;
    sgd.use_momentum = use_momentum;
    sgd.nesterov = c.nesterov && use_momentum;
    multi_tensor_apply<scalar_t>(ptrs, numels(params), sgd);
  });
}

// out[i] = tensors[i] * factor[i] (cpu_loops.inc's scale). Operands: 0 tensors, 1 out; the factor per tensor.
template <typename acc_t>
struct ScaleElement {
  acc_t factor;
  __device__ acc_t operator()(const acc_t (&v)[1], unsigned /*present*/) const {
    return v[0] * factor;
  }
};

template <typename acc_t>
struct ScaleOp {
  static constexpr int kDepth = 2;
  static constexpr int kIn = 1;
  static constexpr int kOut = 1;
  using TensorValues = ScaleElement<acc_t>;
  __device__ ScaleElement<acc_t> for_tensor(const TensorValues& values) const {
    return values;
  }
};

void scale_into(Cuda, at::TensorList out, at::TensorList tensors, const std::vector<double>& factors) {
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  std::vector<std::array<void*, 2>> ptrs;
  for (const auto i : c10::irange(tensors.size())) {
    ptrs.push_back({input(tensors[i]), out[i].mutable_data_ptr()});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "scale_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<ScaleElement<acc_t>> values;
    for (const double factor : factors) {
      values.push_back({static_cast<acc_t>(factor)});
    }
    multi_tensor_apply<scalar_t>(ptrs, numels(tensors), ScaleOp<acc_t>{}, values);
  });
}

// ----------------------------------------------------------------------------------------------- LARS

// Doubles per row of LARS's device buffer: per chunk its partial sums {Σθ², Σd², Σd·v}; per tensor its
// scalars, {q, -, -} for the step and {projection applies (1 or 0), ⟨d, v⟩/‖d‖², -lr q} for the VJP.
constexpr int kLarsRow = 3;
constexpr int kWarps = kThreads / 32;

// Per tensor of the sums' launch: the row of its chunk 0 in the partials, and whether it decays.
struct LarsSumsTensor {
  int32_t first;
  bool decays;
};

// v[j] summed over the block, by warp shuffles and then across warps, in a fixed order (deterministic);
// the result is valid in thread 0 only.
__device__ void block_sum(double (&v)[kLarsRow]) {
  __shared__ double warp_sums[kWarps][kLarsRow];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kLarsRow; ++j) {
    for (int offset = 16; offset > 0; offset /= 2) {
      v[j] += __shfl_down_sync(0xffffffffu, v[j], offset);
    }
    if (lane == 0) {
      warp_sums[warp][j] = v[j];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < kLarsRow; ++j) {
      v[j] = lane < kWarps ? warp_sums[lane][j] : 0.0;
      for (int offset = kWarps / 2; offset > 0; offset /= 2) {
        v[j] += __shfl_down_sync(0xffffffffu, v[j], offset);
      }
    }
  }
}

// One block per chunk: the chunk's {Σθ², Σd², Σd·v} (d = g + wd θ where the tensor decays, else g, in opmath
// and then widened, as cpu_loops.inc's lars_sums; no vector: Σd·v = 0) into its row of `partials`.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) lars_sums_kernel(
    const __grid_constant__ TensorListMeta<3, LarsSumsTensor> meta, const at::opmath_type<scalar_t> weight_decay,
    double* partials) {
  using acc_t = at::opmath_type<scalar_t>;
  const int t = meta.block_tensor[blockIdx.x];
  const int chunk = meta.block_chunk[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(chunk) * kChunk;
  const int64_t left = meta.numel[t] - begin;
  const int n = left < kChunk ? static_cast<int>(left) : kChunk;
  const scalar_t* theta = static_cast<const scalar_t*>(meta.ptrs[0][t]) + begin;
  const scalar_t* grad = static_cast<const scalar_t*>(meta.ptrs[1][t]) + begin;
  const scalar_t* vec = static_cast<const scalar_t*>(meta.ptrs[2][t]);
  const LarsSumsTensor tensor = meta.values[t];
  double sums[kLarsRow] = {0.0, 0.0, 0.0};
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const scalar_t th = theta[i];
    acc_t d = static_cast<acc_t>(grad[i]);
    if (tensor.decays) {
      d = d + weight_decay * static_cast<acc_t>(th);
    }
    const double tw = static_cast<double>(static_cast<acc_t>(th)), dw = static_cast<double>(d);
    sums[0] += tw * tw;
    sums[1] += dw * dw;
    if (vec != nullptr) {
      sums[2] += dw * static_cast<double>(static_cast<acc_t>(vec[begin + i]));
    }
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
    double* row = partials + kLarsRow * (static_cast<int64_t>(tensor.first) + chunk);
#pragma unroll
    for (int j = 0; j < kLarsRow; ++j) {
      row[j] = sums[j];
    }
  }
}

// The combine step's tensors, by value: per entry the tensor (its row of scalars), the row of its chunk 0
// in the partials and its number of chunks.
constexpr int kCombineMax = 320;
struct LarsCombineMeta {
  int32_t tensor[kCombineMax];
  int32_t first[kCombineMax];
  int32_t chunks[kCombineMax];
};

struct LarsCombineArgs {
  double lr, eta;
  bool vjp;
  const double* partials;
  double* scalars;
};
static_assert(sizeof(LarsCombineMeta) + sizeof(int) + sizeof(LarsCombineArgs) <= 4096, "kernel arguments: 4 KiB");

// One thread per tensor: its sums, its chunks' partials added in chunk order (as the CPU adds its chunks'),
// then its row of scalars.
__global__ void lars_combine_kernel(
    const __grid_constant__ LarsCombineMeta meta, const int count, const LarsCombineArgs args) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= count) {
    return;
  }
  double sums[kLarsRow] = {0.0, 0.0, 0.0};
  const double* partial = args.partials + kLarsRow * static_cast<int64_t>(meta.first[e]);
  for (int c = 0; c < meta.chunks[e]; ++c) {
#pragma unroll
    for (int j = 0; j < kLarsRow; ++j) {
      sums[j] += partial[kLarsRow * c + j];
    }
  }
  double* row = args.scalars + kLarsRow * static_cast<int64_t>(meta.tensor[e]);
  if (!args.vjp) {
    row[0] = lars_trust_ratio(args.eta, sums[0], sums[1]);
    return;
  }
  const LarsVjpScalars s = lars_vjp_scalars(args.lr, args.eta, sums[0], sums[1], sums[2]);
  row[0] = s.project ? 1.0 : 0.0;
  row[1] = s.projection;
  row[2] = s.factor;
}

void launch_lars_combine(
    const std::vector<std::array<int32_t, 3>>& entries, const LarsCombineArgs& args, cudaStream_t stream) {
  constexpr int kCombineThreads = 128;
  for (size_t begin = 0; begin < entries.size(); begin += kCombineMax) {
    const int count = static_cast<int>(std::min<size_t>(kCombineMax, entries.size() - begin));
    LarsCombineMeta meta{};
    for (const auto e : c10::irange(count)) {
      meta.tensor[e] = entries[begin + e][0];
      meta.first[e] = entries[begin + e][1];
      meta.chunks[e] = entries[begin + e][2];
    }
    lars_combine_kernel<<<(count + kCombineThreads - 1) / kCombineThreads, kCombineThreads, 0, stream>>>(
        meta, count, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// LARS's per-tensor scalars on the device: a float64 tensor of kLarsRow values per tensor (rows of tensors
// that do not adapt, or are empty, are left unset and never read). `vectors` empty: the step's (q), else the
// VJP's. Launches the sums and the combine step on the current stream; no sync.
template <typename scalar_t>
at::Tensor lars_device_scalars(
    at::TensorList params, at::TensorList grads, at::TensorList vectors, const LarsFlags& flags, double lr) {
  std::vector<std::array<void*, 3>> ptrs;
  std::vector<int64_t> numel;
  std::vector<LarsSumsTensor> values;
  std::vector<std::array<int32_t, 3>> entries;  // {tensor, first chunk's row, chunks}
  int64_t rows = 0;
  for (const auto i : c10::irange(params.size())) {
    const at::Tensor& p = params[i];
    if (!flags.adapts(p) || p.numel() == 0) {
      continue;
    }
    const int64_t chunks = (p.numel() + kChunk - 1) / kChunk;
    TORCH_CHECK(rows + chunks + static_cast<int64_t>(params.size()) <= std::numeric_limits<int32_t>::max(),
                "lars: too many chunks");
    ptrs.push_back({input(p), input(grads[i]), vectors.empty() ? nullptr : input(vectors[i])});
    numel.push_back(p.numel());
    values.push_back({static_cast<int32_t>(rows), flags.decays(p)});
    entries.push_back({static_cast<int32_t>(i), static_cast<int32_t>(rows), static_cast<int32_t>(chunks)});
    rows += chunks;
  }
  const auto n = static_cast<int64_t>(params.size());
  at::Tensor buffer = at::empty({kLarsRow * (rows + n)}, params[0].options().dtype(at::kDouble));
  double* partials = buffer.mutable_data_ptr<double>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  using Meta = TensorListMeta<3, LarsSumsTensor>;
  using acc_t = at::opmath_type<scalar_t>;
  const auto weight_decay = static_cast<acc_t>(flags.weight_decay);
  for_each_launch<Meta>(ptrs, numel, values, [&](const Meta& meta, int blocks) {
    lars_sums_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(meta, weight_decay, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const LarsCombineArgs args{lr, flags.eta, !vectors.empty(), partials, partials + kLarsRow * rows};
  launch_lars_combine(entries, args, stream);
  return buffer.narrow(0, kLarsRow * rows, kLarsRow * n);
}

// Per tensor of the element-wise launches: its row of scalars (its index), and LarsFlags's verdicts.
struct LarsTensor {
  int32_t index;
  bool decays, adapts;
};

// cpu_loops.inc's lars_step. Operands: 0 params, 1 grads, 2 momentum buffers (absent: none yet), 3 out.
template <typename acc_t>
struct LarsStepElement {
  acc_t weight_decay, ratio, momentum, neg_lr;
  bool decays;
  __device__ acc_t operator()(const acc_t (&v)[3], unsigned present) const {
    acc_t d = v[1];
    if (decays) {
      d = d + weight_decay * v[0];
    }
    d = d * ratio;
    acc_t moved = d;
    if (present & (1u << 2)) {
      moved = v[2] * momentum + d;
    }
    return v[0] + neg_lr * moved;
  }
};

template <typename acc_t>
struct LarsStepOp {
  static constexpr int kDepth = 4;
  static constexpr int kIn = 3;
  static constexpr int kOut = 3;
  using TensorValues = LarsTensor;
  acc_t weight_decay, momentum, neg_lr;
  const double* scalars;  // the device rows of lars_device_scalars: q of each tensor that adapts
  __device__ LarsStepElement<acc_t> for_tensor(const LarsTensor& s) const {
    const acc_t ratio = s.adapts ? static_cast<acc_t>(scalars[kLarsRow * s.index]) : acc_t(1);
    return {weight_decay, ratio, momentum, neg_lr, s.decays};
  }
};

void lars_step_into(
    Cuda, at::TensorList out, at::TensorList params, at::TensorList grads,
    const std::vector<std::optional<at::Tensor>>& buffer, double lr, double momentum, const LarsFlags& flags) {
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  std::vector<std::array<void*, 4>> ptrs;
  std::vector<LarsTensor> values;
  for (const auto i : c10::irange(params.size())) {
    // A buffer is read wherever it exists, also with momentum 0 (as the CPU's kBuffer).
    ptrs.push_back({input(params[i]), input(grads[i]), input_or_null(buffer[i]), out[i].mutable_data_ptr()});
    values.push_back({static_cast<int32_t>(i), flags.decays(params[i]), flags.adapts(params[i])});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_lars_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor scalars = lars_device_scalars<scalar_t>(params, grads, {}, flags, lr);
    const LarsStepOp<acc_t> op{static_cast<acc_t>(flags.weight_decay), static_cast<acc_t>(momentum),
                               static_cast<acc_t>(-lr), scalars.const_data_ptr<double>()};
    multi_tensor_apply<scalar_t>(ptrs, numels(params), op, values);
  });
}

// cpu_loops.inc's lars_vjp where the projection applies, its scale (u = -lr v) where not. Operands: 0 params,
// 1 grads (both absent, not read, for tensors that do not adapt), 2 vectors, 3 out.
template <typename acc_t>
struct LarsVjpElement {
  acc_t weight_decay, projection, factor;
  bool decays, project;
  __device__ acc_t operator()(const acc_t (&v)[3], unsigned /*present*/) const {
    if (!project) {
      return v[2] * factor;
    }
    acc_t d = v[1];
    if (decays) {
      d = d + weight_decay * v[0];
    }
    return (v[2] - d * projection) * factor;
  }
};

template <typename acc_t>
struct LarsVjpOp {
  static constexpr int kDepth = 4;
  static constexpr int kIn = 3;
  static constexpr int kOut = 3;
  using TensorValues = LarsTensor;
  acc_t weight_decay, neg_lr;
  const double* scalars;  // the device rows of lars_device_scalars: {project, projection, factor}
  __device__ LarsVjpElement<acc_t> for_tensor(const LarsTensor& s) const {
    if (!s.adapts) {
      return {weight_decay, acc_t(0), neg_lr, s.decays, false};
    }
    const double* row = scalars + kLarsRow * s.index;
    return {weight_decay, static_cast<acc_t>(row[1]), static_cast<acc_t>(row[2]), s.decays, row[0] != 0.0};
  }
};

void lars_vjp_into(
    Cuda, at::TensorList out, at::TensorList params, at::TensorList grads, at::TensorList vectors, double lr,
    const LarsFlags& flags) {
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  std::vector<std::array<void*, 4>> ptrs;
  std::vector<LarsTensor> values;
  for (const auto i : c10::irange(params.size())) {
    const bool adapts = flags.adapts(params[i]);
    ptrs.push_back({adapts ? input(params[i]) : nullptr, adapts ? input(grads[i]) : nullptr, input(vectors[i]),
                    out[i].mutable_data_ptr()});
    values.push_back({static_cast<int32_t>(i), flags.decays(params[i]), adapts});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lars_vjp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor scalars = lars_device_scalars<scalar_t>(params, grads, vectors, flags, lr);
    const LarsVjpOp<acc_t> op{static_cast<acc_t>(flags.weight_decay), static_cast<acc_t>(-lr),
                              scalars.const_data_ptr<double>()};
    multi_tensor_apply<scalar_t>(ptrs, numels(params), op, values);
  });
}

// ---------------------------------------------------------------------------------------------- AdamW

// AdamW's scalars that do not depend on the step, in opmath, as cpu_loops.inc's adamw_step and adamw_vjp
// cast them.
template <typename acc_t>
struct AdamwConstants {
  acc_t beta2, c1, one_minus_c1, c2, eps;  // c1 = 1 - β1, c2 = 1 - β2
  bool c1_small;                           // torch's lerp: the first of its two formulas
};

template <typename acc_t>
AdamwConstants<acc_t> adamw_constants(const AdamwScalars& a) {
  AdamwConstants<acc_t> k{};
  k.beta2 = static_cast<acc_t>(a.beta2);
  k.c1 = static_cast<acc_t>(a.one_minus_beta1);
  k.one_minus_c1 = static_cast<acc_t>(1 - static_cast<acc_t>(a.one_minus_beta1));
  k.c2 = static_cast<acc_t>(a.one_minus_beta2);
  k.eps = static_cast<acc_t>(a.eps);
  k.c1_small = std::abs(k.c1) < acc_t(0.5);
  return k;
}

// cpu_loops.inc's adamw_moments: m = lerp(m₀, g, 1-β1) as torch computes it, s = β2 s₀ + (1-β2) g g.
template <typename acc_t>
__device__ __forceinline__ void adamw_moments(
    acc_t g, acc_t m0, acc_t s0, const AdamwConstants<acc_t>& k, acc_t& m, acc_t& s) {
  m = k.c1_small ? m0 + k.c1 * (g - m0) : g - (g - m0) * k.one_minus_c1;
  s = s0 * k.beta2 + k.c2 * g * g;
}

// Per tensor: the bias corrections of its step.
template <typename acc_t>
struct AdamwTensor {
  acc_t step_size, bias2, bias2_sqrt;
};

// cpu_loops.inc's adamw_step. Operands: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs (both absent: no state;
// an absent moment reads as 0), 4 out.
template <typename acc_t>
struct AdamwStepElement {
  AdamwConstants<acc_t> k;
  acc_t decay, step_size, bias2_sqrt;
  __device__ acc_t operator()(const acc_t (&v)[4], unsigned /*present*/) const {
    acc_t m, s;
    adamw_moments(v[1], v[2], v[3], k, m, s);
    const acc_t denominator = ieee_sqrt(s) / bias2_sqrt + k.eps;
    // torch's addcdiv: θ + (value · m) / D.
    return v[0] * decay + step_size * m / denominator;
  }
};

template <typename acc_t>
struct AdamwStepOp {
  static constexpr int kDepth = 5;
  static constexpr int kIn = 4;
  static constexpr int kOut = 4;
  using TensorValues = AdamwTensor<acc_t>;
  AdamwConstants<acc_t> k;
  acc_t decay;  // 1 - lr wd
  __device__ AdamwStepElement<acc_t> for_tensor(const TensorValues& s) const {
    return {k, decay, s.step_size, s.bias2_sqrt};
  }
};

// cpu_loops.inc's adamw_vjp. Operands: 0 grads, 1 exp_avgs, 2 exp_avg_sqs (as in AdamwStepElement), 3 vectors,
// 4 out.
template <typename acc_t>
struct AdamwVjpElement {
  AdamwConstants<acc_t> k;
  acc_t step_size, bias2, bias2_sqrt;
  __device__ acc_t operator()(const acc_t (&v)[4], unsigned /*present*/) const {
    const acc_t g = v[0];
    acc_t m, s;
    adamw_moments(g, v[1], v[2], k, m, s);
    const acc_t sigma = ieee_sqrt(s) / bias2_sqrt;
    const acc_t denominator = sigma + k.eps;
    const acc_t curvature = sigma > 0 ? m * k.c2 * g / (bias2 * sigma * (denominator * denominator)) : acc_t(0);
    return v[3] * (k.c1 / denominator - curvature) * step_size;
  }
};

template <typename acc_t>
struct AdamwVjpOp {
  static constexpr int kDepth = 5;
  static constexpr int kIn = 4;
  static constexpr int kOut = 4;
  using TensorValues = AdamwTensor<acc_t>;
  AdamwConstants<acc_t> k;
  __device__ AdamwVjpElement<acc_t> for_tensor(const TensorValues& s) const {
    return {k, s.step_size, s.bias2, s.bias2_sqrt};
  }
};

// Per step number, adamw_scalars (weight_decay 0 for the VJP) as the per-tensor values, in opmath.
template <typename acc_t>
std::vector<AdamwTensor<acc_t>> adamw_tensor_values(const std::vector<AdamwScalars>& scalars) {
  std::vector<AdamwTensor<acc_t>> values;
  values.reserve(scalars.size());
  for (const AdamwScalars& a : scalars) {
    values.push_back({static_cast<acc_t>(a.step_size), static_cast<acc_t>(a.bias2), static_cast<acc_t>(a.bias2_sqrt)});
  }
  return values;
}

void adamw_step_into(
    Cuda, at::TensorList out, at::TensorList params, at::TensorList grads, const AdamwState& state,
    at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps, double weight_decay) {
  const std::vector<AdamwScalars> scalars = adamw_scalars_per_tensor(steps, lr, beta1, beta2, eps, weight_decay);
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  std::vector<std::array<void*, 5>> ptrs;
  for (const auto i : c10::irange(params.size())) {
    ptrs.push_back({input(params[i]), input(grads[i]), input_or_null(state.exp_avg[i]),
                    input_or_null(state.exp_avg_sq[i]), out[i].mutable_data_ptr()});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_adamw_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // scalars[0]: the step-independent ones are alike for every tensor.
    const AdamwStepOp<acc_t> op{adamw_constants<acc_t>(scalars[0]), static_cast<acc_t>(scalars[0].decay)};
    multi_tensor_apply<scalar_t>(ptrs, numels(params), op, adamw_tensor_values<acc_t>(scalars));
  });
}

void adamw_vjp_into(
    Cuda, at::TensorList out, at::TensorList grads, const AdamwState& state, at::ArrayRef<double> steps,
    at::TensorList vectors, double lr, double beta1, double beta2, double eps) {
  const std::vector<AdamwScalars> scalars = adamw_scalars_per_tensor(steps, lr, beta1, beta2, eps, 0.0);
  const c10::cuda::CUDAGuard device_guard(grads[0].device());
  std::vector<std::array<void*, 5>> ptrs;
  for (const auto i : c10::irange(grads.size())) {
    ptrs.push_back({input(grads[i]), input_or_null(state.exp_avg[i]), input_or_null(state.exp_avg_sq[i]),
                    input(vectors[i]), out[i].mutable_data_ptr()});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "adamw_vjp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AdamwVjpOp<acc_t> op{adamw_constants<acc_t>(scalars[0])};
    multi_tensor_apply<scalar_t>(ptrs, numels(grads), op, adamw_tensor_values<acc_t>(scalars));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CUDA, m) {
  register_optimizer_ops<Cuda>(m);
}

}  // namespace metamask_fast
