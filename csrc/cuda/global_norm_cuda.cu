// CUDA kernel of metamask_fast::global_norm: sqrt(sum_i sum_j t_i[j]^2) over a list of tensors.
//
// One launch covers the whole list. Every tensor is cut into chunks of kChunk elements; block b reduces
// chunk b of whichever tensor holds it and writes one partial sum. A second, single-block launch adds the
// partials in a fixed order and takes the square root, so the result is deterministic (no atomics).
//
// Range: the op is right for every finite input by itself, without a check on the host (no sync), under
// torch.compile and through torch.ops alike. float32, float16 and bfloat16 values are squared and summed in
// float64, where no square of theirs overflows or underflows (float32's largest square is 1.2e77, its
// smallest denormal's 2e-90). float64 values are scaled: each block sums (x / s)^2 with s the power of two
// just above its chunk's largest magnitude (exact scaling, a second read of a chunk the cache still
// holds), and the finishing block combines the blocks' (s, sum) pairs in units of the largest s. NaN and
// inf inputs give NaN and inf.

// Per-operator headers instead of ATen/ATen.h: they compile much faster.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE headers.
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "../tensor_list_checks.h"

namespace metamask_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 64 elements per thread: enough work per block to hide the chunk lookup, small enough that a model of a
// few million weights still fills every SM.
constexpr int64_t kChunk = 64 * kThreads;

// Sum over the block, by warp shuffles and then across warps; the result is valid in thread 0 only.
// The order of additions is fixed, so repeated calls give identical results.
__device__ double block_sum(double value) {
  __shared__ double warp_sums[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = 0.0;
  if (warp == 0) {
    if (lane < kWarps) {
      value = warp_sums[lane];
    }
    for (int offset = kWarps / 2; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

// One block's chunk: a sum of squares in float64 and the power-of-two scale it is in units of (1 for the
// narrow types, whose squares always fit float64).
struct Partial {
  double scale;
  double sum;
};

// The scale of a chunk whose largest magnitude is `peak`: 2^k with |x| / 2^k < 2 for every x of the chunk
// (squares below 4), k clamped to [-1000, 1023] so that 2^k and 2^-k are both exact doubles. A peak of 0,
// inf or NaN gets 1: the chunk's sum is then 0, inf or NaN unscaled, as the norm is.
__device__ double chunk_scale(double peak) {
  if (!(peak > 0) || isinf(peak)) {
    return 1.0;
  }
  int exponent;
  frexp(peak, &exponent);  // peak = m 2^exponent with 0.5 <= m < 1
  return ldexp(1.0, min(max(exponent, -1000), 1023));
}

// The largest value over the block (fmax: NaN is dropped unless every value is NaN), returned to every
// thread.
__device__ double block_max(double value) {
  __shared__ double warp_max[kWarps];
  __shared__ double result;
  for (int offset = 16; offset > 0; offset /= 2) {
    value = fmax(value, __shfl_down_sync(0xffffffffu, value, offset));
  }
  if (threadIdx.x % 32 == 0) {
    warp_max[threadIdx.x / 32] = value;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      value = fmax(value, warp_max[w]);
    }
    result = value;
  }
  __syncthreads();
  return result;
}

// meta holds, for T tensors: T data pointers, T sizes, then T + 1 chunk offsets (first_chunk[t] is the
// index of the first chunk of tensor t, first_chunk[T] the number of chunks). partial has one entry per chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    chunk_sum_of_squares(const int64_t* __restrict__ meta, int64_t num_tensors, Partial* __restrict__ partial) {
  const int64_t* data = meta;
  const int64_t* numel = meta + num_tensors;
  const int64_t* first_chunk = meta + 2 * num_tensors;
  const int64_t chunk = blockIdx.x;

  // Find t with first_chunk[t] <= chunk < first_chunk[t + 1]. Empty tensors repeat an offset, so take the
  // last t with first_chunk[t] <= chunk. Invariant: first_chunk[lo] <= chunk < first_chunk[hi].
  int64_t lo = 0;
  int64_t hi = num_tensors;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid;
    }
  }

  const scalar_t* x = reinterpret_cast<const scalar_t*>(data[lo]);
  const int64_t begin = (chunk - first_chunk[lo]) * kChunk;
  const int64_t end = begin + kChunk < numel[lo] ? begin + kChunk : numel[lo];
  double scale = 1.0;
  if constexpr (std::is_same_v<scalar_t, double>) {
    double peak = 0.0;
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      peak = fmax(peak, fabs(x[i]));  // a NaN is dropped here and reaches the sum below
    }
    scale = chunk_scale(block_max(peak));
  }
  const double inverse = 1.0 / scale;  // exact: a power of two within range
  double sum = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double v = static_cast<double>(x[i]) * inverse;
    sum += v * v;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    partial[chunk] = Partial{scale, sum};
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    finish_norm(const Partial* __restrict__ partial, int64_t num_chunks, scalar_t* __restrict__ out) {
  double peak = 0.0;
  for (int64_t i = threadIdx.x; i < num_chunks; i += kThreads) {
    peak = fmax(peak, partial[i].scale);
  }
  peak = block_max(peak);
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < num_chunks; i += kThreads) {
    // Powers of two: the ratio is exact (or 0 for a chunk too small to matter), and (sum * ratio) * ratio
    // keeps an inf sum inf.
    const double ratio = partial[i].scale / peak;
    sum += partial[i].sum * ratio * ratio;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    *out = static_cast<scalar_t>(sqrt(sum) * peak);
  }
}

at::Tensor global_norm_cuda(at::TensorList tensors) {
  check_tensor_list("global_norm", "tensors", tensors);
  const c10::cuda::CUDAGuard device_guard(tensors[0].device());
  const auto num_tensors = static_cast<int64_t>(tensors.size());

  // Strided tensors are read through a contiguous copy (a no-op for the usual parameter lists). Freeing the
  // copies on return is safe: the caching allocator reuses their memory only in this stream's order.
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  // Pinned, so the copy to the device below is asynchronous; the host allocator keeps the buffer until the
  // copy has run.
  at::Tensor meta = at::empty({3 * num_tensors + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* host = meta.data_ptr<int64_t>();
  int64_t num_chunks = 0;
  for (const auto t : c10::irange(num_tensors)) {
    // Dense tensors (contiguous, channels_last, ...) are read as the flat arrays they are.
    contiguous.push_back(tensors[t].is_non_overlapping_and_dense() ? tensors[t] : tensors[t].contiguous());
    const int64_t n = contiguous.back().numel();
    host[t] = reinterpret_cast<intptr_t>(contiguous.back().const_data_ptr());
    host[num_tensors + t] = n;
    host[2 * num_tensors + t] = num_chunks;
    num_chunks += (n + kChunk - 1) / kChunk;
  }
  host[3 * num_tensors] = num_chunks;

  at::Tensor out = at::empty({}, tensors[0].options());
  if (num_chunks == 0) {
    return out.zero_();
  }
  const at::Tensor meta_device = meta.to(tensors[0].device(), at::kLong, /*non_blocking=*/true);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // (scale, sum) pairs as float64 pairs.
  at::Tensor partials = at::empty({num_chunks, 2}, tensors[0].options().dtype(at::kDouble));
  auto* partial = reinterpret_cast<Partial*>(partials.mutable_data_ptr<double>());
  static_assert(sizeof(Partial) == 2 * sizeof(double), "Partial is read as two doubles");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "global_norm_cuda", [&] {
    chunk_sum_of_squares<scalar_t><<<static_cast<unsigned int>(num_chunks), kThreads, 0, stream>>>(
        meta_device.const_data_ptr<int64_t>(), num_tensors, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_norm<scalar_t><<<1, kThreads, 0, stream>>>(partial, num_chunks, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CUDA, m) {
  m.impl("global_norm", &global_norm_cuda);
}

}  // namespace metamask_fast
