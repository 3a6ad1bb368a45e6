// CUDA kernel of metamask_fast::global_norm: sqrt(sum_i sum_j t_i[j]^2) over a list of tensors.
//
// One launch covers the whole list. Every tensor is cut into chunks of kChunk elements; block b reduces
// chunk b of whichever tensor holds it and writes one partial sum. A second, single-block launch adds the
// partials in a fixed order and takes the square root, so the result is deterministic (no atomics).
// Accumulation is in at::opmath_type: float32 for float32/float16/bfloat16 inputs, float64 for float64.

// Per-operator headers instead of ATen/ATen.h: they compile much faster.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE headers.
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cstdint>
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
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t warp_sums[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  value = acc_t(0);
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

// meta holds, for T tensors: T data pointers, T sizes, then T + 1 chunk offsets (first_chunk[t] is the
// index of the first chunk of tensor t, first_chunk[T] the number of chunks). partial has one entry per chunk.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    chunk_sum_of_squares(const int64_t* __restrict__ meta, int64_t num_tensors, acc_t* __restrict__ partial) {
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
  acc_t sum = acc_t(0);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const acc_t v = static_cast<acc_t>(x[i]);
    sum += v * v;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    partial[chunk] = sum;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finish_norm(const acc_t* __restrict__ partial, int64_t num_chunks, scalar_t* __restrict__ out) {
  acc_t sum = acc_t(0);
  for (int64_t i = threadIdx.x; i < num_chunks; i += kThreads) {
    sum += partial[i];
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) {
    *out = static_cast<scalar_t>(sqrt(sum));
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "global_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({num_chunks}, tensors[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    chunk_sum_of_squares<scalar_t, acc_t><<<static_cast<unsigned int>(num_chunks), kThreads, 0, stream>>>(
        meta_device.const_data_ptr<int64_t>(), num_tensors, partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_norm<scalar_t, acc_t><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), num_chunks, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CUDA, m) {
  m.impl("global_norm", &global_norm_cuda);
}

}  // namespace metamask_fast
