// The multi-tensor apply machinery of the CUDA kernels: element-wise ops over lists of tensors in few launches,
// with no host-to-device copy (the launch design is described at the top of multi_tensor_ops_cuda.cu).
//
// An op is a functor with kDepth (operand lists), kIn (it reads lists 0 .. kIn - 1) and kOut (the list it
// writes), and `__device__ acc_t operator()(const acc_t (&v)[kIn], unsigned present) const`, which maps one
// element's inputs, in at::opmath_type, to its output; `present` has bit k set when list k has a tensor for
// the current chunk (an absent input reads as 0 and is not read from memory).
// Per-tensor values: an op that declares `using TensorValues = V;` (a trivially copyable struct) gets one V
// per tensor, given to multi_tensor_apply as a vector and carried by value in the metadata like the
// pointers (fewer tensors fit per launch: max_tensors). Instead of operator() it then has
// `__device__ F for_tensor(const V&) const`, called once per block, which returns the element functor F
// (with that operator()) for the block's tensor.
//
// Everything here is in an unnamed namespace: each .cu file that includes it gets its own kernels (there is
// no relocatable device code to share them across translation units anyway).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
// c10's stream header rather than ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE headers.
#include <c10/cuda/CUDAStream.h>
#include <c10/util/irange.h>

#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace metamask_fast {
namespace {

constexpr int kThreads = 512;
constexpr int kVec = 4;     // elements per vector access
constexpr int kUnroll = 2;  // vectors in flight per thread and iteration
// Elements per block: 8 iterations of kThreads * kVec * kUnroll, a multiple of kVec as the vector path needs.
constexpr int kChunk = 8 * kThreads * kVec * kUnroll;
constexpr int kMaxBlocks = 384;  // blocks per launch
// Bytes of kernel arguments for the metadata; the rest of the 4 KiB limit is left for the op's scalars.
constexpr int kMetaBytes = 3840;
static_assert(kChunk % kVec == 0, "the vector path needs chunks of whole vectors");

// Tensors per launch for `depth` operand lists and `value_bytes` of per-tensor values: what fits beside the
// per-block entries (5 bytes each).
constexpr int max_tensors(int depth, int value_bytes = 0) {
  return (kMetaBytes - kMaxBlocks * 5) / (8 * (depth + 1) + value_bytes);
}

// The per-tensor values of ops that have none (an empty base: no bytes in the metadata).
struct NoTensorValues {};

template <typename Op, typename = void>
struct TensorValuesOf {
  using type = NoTensorValues;
};
template <typename Op>
struct TensorValuesOf<Op, std::void_t<typename Op::TensorValues>> {
  using type = typename Op::TensorValues;
};

template <typename Values>
constexpr int value_bytes() {
  return std::is_same<Values, NoTensorValues>::value ? 0 : static_cast<int>(sizeof(Values));
}

template <typename Values, int n>
struct PerTensorValues {
  static_assert(std::is_trivially_copyable<Values>::value, "kernel arguments are copied bytewise");
  static constexpr bool kHasValues = true;
  Values values[n];  // values[t]: those of tensor slot t
};
template <int n>
struct PerTensorValues<NoTensorValues, n> {
  static constexpr bool kHasValues = false;
};

template <int depth, typename Values = NoTensorValues>
struct TensorListMeta : PerTensorValues<Values, max_tensors(depth, value_bytes<Values>())> {
  static constexpr int kMaxTensors = max_tensors(depth, value_bytes<Values>());
  static_assert(kMaxTensors > 0 && kMaxTensors <= 256, "block_tensor is one byte");
  void* ptrs[depth][kMaxTensors];  // ptrs[k][t]: operand list k of tensor t; nullptr: absent (not read)
  int64_t numel[kMaxTensors];
  int32_t block_chunk[kMaxBlocks];  // chunk index, within its tensor, of each block
  uint8_t block_tensor[kMaxBlocks];  // tensor slot of each block
};

// The metadata of op type Op.
template <typename Op>
using MetaOf = TensorListMeta<Op::kDepth, typename TensorValuesOf<Op>::type>;

// The element functor of a block of tensor slot t: op itself, or op.for_tensor(its values).
template <typename Op, typename Meta>
__device__ __forceinline__ decltype(auto) element_op(const Op& op, const Meta& meta, int t) {
  if constexpr (Meta::kHasValues) {
    return op.for_tensor(meta.values[t]);
  } else {
    return (op);
  }
}

// A thread's widest access is 16 bytes (ld.global.v4.f32, v2.f64): four doubles are two such accesses and
// need 16-byte alignment, not 32, so views that start 16 bytes into an allocation keep the vector path.
template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kVec < 16 ? sizeof(scalar_t) * kVec : 16) Vec {
  scalar_t v[kVec];
};

template <typename scalar_t, typename Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const __grid_constant__ MetaOf<Op> meta, const Op op) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kIn = Op::kIn;
  const int t = meta.block_tensor[blockIdx.x];
  const auto& f = element_op(op, meta, t);
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t left = meta.numel[t] - begin;
  const int n = left < kChunk ? static_cast<int>(left) : kChunk;

  // No __restrict__: add_scaled_ may be given one list twice, and in-place ops write what they read.
  scalar_t* p[Op::kDepth];
  unsigned present = 0;
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < Op::kDepth; ++k) {
    p[k] = static_cast<scalar_t*>(meta.ptrs[k][t]);
    if (p[k] != nullptr) {
      p[k] += begin;
      present |= 1u << k;
      aligned = aligned && reinterpret_cast<uintptr_t>(p[k]) % alignof(Vec<scalar_t>) == 0;
    }
  }

  int scalar_begin = 0;
  if (aligned) {
    const int n_vec = n / kVec * kVec;
    scalar_begin = n_vec;
    for (int base = threadIdx.x * kVec; base < n_vec; base += kThreads * kVec * kUnroll) {
      // All loads of the iteration first, then the math and the stores: kUnroll * kIn loads in flight.
      acc_t x[kUnroll][kIn][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads * kVec;
#pragma unroll
        for (int k = 0; k < kIn; ++k) {
          if (i < n_vec && (present & (1u << k))) {
            const Vec<scalar_t> raw = *reinterpret_cast<const Vec<scalar_t>*>(p[k] + i);
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
              x[u][k][j] = static_cast<acc_t>(raw.v[j]);
            }
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) {
              x[u][k][j] = acc_t(0);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads * kVec;
        if (i < n_vec) {
          Vec<scalar_t> result;
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            acc_t in[kIn];
#pragma unroll
            for (int k = 0; k < kIn; ++k) {
              in[k] = x[u][k][j];
            }
            result.v[j] = static_cast<scalar_t>(f(in, present));
          }
          *reinterpret_cast<Vec<scalar_t>*>(p[Op::kOut] + i) = result;
        }
      }
    }
  }
  for (int i = scalar_begin + threadIdx.x; i < n; i += kThreads) {
    acc_t in[kIn];
#pragma unroll
    for (int k = 0; k < kIn; ++k) {
      in[k] = (present & (1u << k)) ? static_cast<acc_t>(p[k][i]) : acc_t(0);
    }
    p[Op::kOut][i] = static_cast<scalar_t>(f(in, present));
  }
}

// Cuts tensors 0 .. numel.size() - 1 into chunks and fills `Meta` with them (ptrs[t][k]: operand k of tensor
// t, nullptr where absent; values[t]: its per-tensor values, where Meta has them), calling
// launch(meta, blocks) whenever it is full and at the end. Empty tensors take no block.
template <typename Meta, size_t depth, typename Values, typename Launch>
void for_each_launch(
    const std::vector<std::array<void*, depth>>& ptrs, const std::vector<int64_t>& numel,
    const std::vector<Values>& values, const Launch& launch) {
  static_assert(sizeof(Meta) <= kMetaBytes, "the metadata must leave room for the op's scalars");
  Meta meta{};
  int slot = 0;  // slot of the current tensor in meta
  int blocks = 0;
  for (const auto t : c10::irange(numel.size())) {
    if (numel[t] == 0) {
      continue;
    }
    const int64_t chunks = (numel[t] + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= std::numeric_limits<int32_t>::max(), "multi_tensor_apply: tensor too large");
    for (const auto k : c10::irange(depth)) {
      meta.ptrs[k][slot] = ptrs[t][k];
    }
    meta.numel[slot] = numel[t];
    if constexpr (Meta::kHasValues) {
      meta.values[slot] = values[t];
    }
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<uint8_t>(slot);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      if (blocks == kMaxBlocks || (last_chunk && slot + 1 == Meta::kMaxTensors)) {
        launch(meta, blocks);
        blocks = 0;
        if (last_chunk) {
          slot = -1;  // the next tensor starts at slot 0
        } else {
          // The rest of this tensor continues in slot 0 of the next launch.
          for (const auto k : c10::irange(depth)) {
            meta.ptrs[k][0] = meta.ptrs[k][slot];
          }
          meta.numel[0] = meta.numel[slot];
          if constexpr (Meta::kHasValues) {
            meta.values[0] = meta.values[slot];
          }
          slot = 0;
        }
      }
    }
    ++slot;
  }
  if (blocks > 0) {
    launch(meta, blocks);
  }
}

// Runs `op` over every tensor: ptrs[t][k] is operand k of tensor t (nullptr: absent), numel[t] its size, and
// values[t] its per-tensor values if the op has them (Op::TensorValues).
template <typename scalar_t, typename Op>
void multi_tensor_apply(
    const std::vector<std::array<void*, Op::kDepth>>& ptrs, const std::vector<int64_t>& numel, const Op& op,
    const std::vector<typename TensorValuesOf<Op>::type>& values = {}) {
  using Meta = MetaOf<Op>;
  static_assert(sizeof(Meta) + sizeof(Op) <= 4096, "kernel arguments must fit in 4 KiB");
  TORCH_CHECK(!Meta::kHasValues || values.size() == numel.size(), "multi_tensor_apply: one value per tensor");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_launch<Meta>(ptrs, numel, values, [&](const Meta& meta, int blocks) {
    multi_tensor_kernel<scalar_t, Op><<<blocks, kThreads, 0, stream>>>(meta, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The lists are already checked to be on one device each and pairwise alike, so list[0] decides.
void check_cuda(const char* op, const char* arg, at::TensorList tensors) {
  TORCH_CHECK_VALUE(
      tensors[0].is_cuda(), op, ": `", arg, "` must be on a CUDA device for this kernel, got ", tensors[0].device());
}

}  // namespace
}  // namespace metamask_fast
