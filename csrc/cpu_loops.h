// The CPU kernels' inner loops (cpu_loops.inc), compiled twice: for the build's default instruction set
// and, on x86 with GCC or Clang, for AVX, picked at run time. ATen does the same for its own kernels
// (CPU_CAPABILITY); an extension has to do it itself. AVX doubles the vector width, which the float64
// accumulation of global_norm needs to keep up with memory; the elementwise sweeps are memory bound either
// way. Include after the ATen headers: the AVX region must not cover them.
//
// Out-of-place sweeps over more memory than the caches hold write with non-temporal stores
// (kStreamingBytes below).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "optimizer_math.h"

#ifdef __SSE2__
#include <emmintrin.h>  // _mm_stream_si128, _mm_sfence (SSE2: every x86-64 CPU)
#endif

namespace metamask_fast {

// Sweeps whose outputs together are at least this large write them with non-temporal stores: they could
// not stay in the cache until read anyway. Smaller outputs are written normally and stay cached.
constexpr int64_t kStreamingBytes = int64_t{16} << 20;

// Whether an out-of-place sweep writing `outs` uses non-temporal stores.
inline bool use_streaming_stores(at::TensorList outs) {
  int64_t bytes = 0;
  for (const at::Tensor& t : outs) {
    bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  return bytes >= kStreamingBytes;
}

struct BaseLoops {
#include "cpu_loops.inc"
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define METAMASK_FAST_AVX_LOOPS 1
#pragma GCC push_options
#pragma GCC target("avx")
struct AvxLoops {
#include "cpu_loops.inc"
};
#pragma GCC pop_options
#endif

// Whether this CPU runs the AVX loops (decided once per process).
inline bool cpu_runs_avx_loops() {
#ifdef METAMASK_FAST_AVX_LOOPS
  static const bool has_avx = __builtin_cpu_supports("avx");
  return has_avx;
#else
  return false;
#endif
}

// The loops with_cpu_loops picks, by name: "avx" or "default" (reported by metamask_fast._C.cpu_loops()).
inline const char* cpu_loops_name() { return cpu_runs_avx_loops() ? "avx" : "default"; }

// Calls f(BaseLoops{}) or f(AvxLoops{}), whichever this CPU runs best.
template <typename F>
decltype(auto) with_cpu_loops(F&& f) {
#ifdef METAMASK_FAST_AVX_LOOPS
  if (cpu_runs_avx_loops()) {
    return f(AvxLoops{});
  }
#endif
  return f(BaseLoops{});
}

}  // namespace metamask_fast
