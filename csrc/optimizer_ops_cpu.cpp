// CPU kernels of the optimizers' virtual updates and their vector-Jacobian products: metamask_fast::
// virtual_sgd_step.out, virtual_lars_step, virtual_adamw_step, sgd_vjp, lars_vjp, adamw_vjp (each also .out).
//
// The registered functions and their checks are optimizer_ops.h's; here are the sweeps. Like
// multi_tensor_ops_cpu.cpp: one at::parallel_for over the chunks of all tensors (cpu_chunks.h), the inner
// loops of cpu_loops.h. LARS needs per-tensor sums first (‖θ‖², ‖d‖², and ⟨d, v⟩ for its VJP): one parallel
// pass writes each chunk's float64 partial sums, which are added per tensor in chunk order (so the result
// does not depend on the number of threads), then a second pass writes the outputs. The arithmetic is that of
// the PyTorch fallbacks in metamask_fast/optim_ops.py, operation for operation.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_chunks.h"
#include "cpu_loops.h"
#include "optimizer_math.h"
#include "optimizer_ops.h"
#include "tensor_list_checks.h"

namespace metamask_fast {
namespace {

// f(std::true_type{}) or f(std::false_type{}): a run-time switch as a compile-time one.
template <typename F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Runs body(loops, chunk) over every chunk of `chunks`, in parallel, with the CPU loops this CPU runs best.
template <typename Body>
void for_each_chunk(const std::vector<Chunk>& chunks, Body body) {
  with_cpu_loops([&](auto loops) {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (const auto c : c10::irange(begin, end)) {
        body(loops, chunks[c]);
      }
    });
  });
}

// The CPU backend of optimizer_ops.h: the dispatcher picked this kernel for CPU tensors.
struct Cpu {};

void check_device(Cpu, const char* /*op*/, const char* /*arg*/, at::TensorList /*tensors*/) {}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t, int64_t offset) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() + offset : nullptr;
}

template <typename scalar_t>
const scalar_t* data(const at::Tensor& t, int64_t offset) {
  return t.const_data_ptr<scalar_t>() + offset;
}

// ------------------------------------------------------------------------------------------------ SGD

void sgd_step_into(
    Cpu, at::TensorList out, at::TensorList params, at::TensorList grads,
    const std::vector<std::optional<at::Tensor>>& buffer, const SgdCoefficients& c) {
  const bool decay = c.weight_decay != 0, use_momentum = c.momentum != 0;
  const std::vector<Chunk> chunks = make_chunks(params);
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_sgd_step_out_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      const scalar_t* b = use_momentum ? data_or_null<scalar_t>(buffer[k.tensor], k.offset) : nullptr;
      with_bool(decay, [&](auto D) {
        with_bool(use_momentum, [&](auto M) {
          with_bool(b != nullptr, [&](auto B) {
            with_bool(c.nesterov && use_momentum, [&](auto N) {
              loops.template sgd<scalar_t, decltype(D)::value, decltype(M)::value, decltype(B)::value,
                                 decltype(N)::value>(
                  out[k.tensor].data_ptr<scalar_t>() + k.offset, data<scalar_t>(params[k.tensor], k.offset),
                  data<scalar_t>(grads[k.tensor], k.offset), b, k.size, c, stream);
            });
          });
        });
      });
    });
  });
}

// out[i] = factors[i] * tensors[i].
void scale_into(Cpu, at::TensorList out, at::TensorList tensors, const std::vector<double>& factors) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "scale_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      loops.scale(out[k.tensor].data_ptr<scalar_t>() + k.offset, data<scalar_t>(tensors[k.tensor], k.offset),
                  factors[k.tensor], k.size, stream);
    });
  });
}

// ----------------------------------------------------------------------------------------------- LARS

// Per tensor {Σ θ², Σ d², Σ d·v} (zeros where the trust ratio does not apply); `vectors` empty: no dot.
std::vector<std::array<double, 3>> lars_sums_per_tensor(
    const std::vector<Chunk>& chunks, at::TensorList params, at::TensorList grads, at::TensorList vectors,
    const LarsFlags& flags) {
  std::vector<std::array<double, 3>> partial(chunks.size(), {0.0, 0.0, 0.0});
  const bool dot = !vectors.empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lars_sums_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      const at::Tensor& p = params[k.tensor];
      if (!flags.adapts(p)) {
        return;
      }
      const scalar_t* v = dot ? data<scalar_t>(vectors[k.tensor], k.offset) : nullptr;
      with_bool(flags.decays(p), [&](auto D) {
        with_bool(dot, [&](auto V) {
          loops.template lars_sums<scalar_t, decltype(D)::value, decltype(V)::value>(
              data<scalar_t>(p, k.offset), data<scalar_t>(grads[k.tensor], k.offset), v, k.size,
              flags.weight_decay, partial[&k - chunks.data()].data());
        });
      });
    });
  });
  std::vector<std::array<double, 3>> sums(params.size(), {0.0, 0.0, 0.0});
  for (const auto c : c10::irange(chunks.size())) {
    for (const auto j : c10::irange(3)) {
      sums[chunks[c].tensor][j] += partial[c][j];
    }
  }
  return sums;
}

void lars_step_into(
    Cpu, at::TensorList out, at::TensorList params, at::TensorList grads,
    const std::vector<std::optional<at::Tensor>>& buffer, double lr, double momentum, const LarsFlags& flags) {
  const std::vector<Chunk> chunks = make_chunks(params);
  const auto sums = lars_sums_per_tensor(chunks, params, grads, {}, flags);
  std::vector<double> ratios;
  for (const auto i : c10::irange(params.size())) {
    ratios.push_back(flags.adapts(params[i]) ? lars_trust_ratio(flags.eta, sums[i][0], sums[i][1]) : 1.0);
  }
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_lars_step_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      const at::Tensor& p = params[k.tensor];
      const scalar_t* b = data_or_null<scalar_t>(buffer[k.tensor], k.offset);
      with_bool(flags.decays(p), [&](auto D) {
        with_bool(b != nullptr, [&](auto B) {
          loops.template lars_step<scalar_t, decltype(D)::value, decltype(B)::value>(
              out[k.tensor].data_ptr<scalar_t>() + k.offset, data<scalar_t>(p, k.offset),
              data<scalar_t>(grads[k.tensor], k.offset), b, k.size, flags.weight_decay, ratios[k.tensor], momentum,
              lr, stream);
        });
      });
    });
  });
}

void lars_vjp_into(
    Cpu, at::TensorList out, at::TensorList params, at::TensorList grads, at::TensorList vectors, double lr,
    const LarsFlags& flags) {
  const std::vector<Chunk> chunks = make_chunks(params);
  const auto sums = lars_sums_per_tensor(chunks, params, grads, vectors, flags);
  // Per tensor: whether the projection applies, its coefficient ⟨d, v⟩/‖d‖², and the factor -lr q.
  std::vector<LarsVjpScalars> scalars;
  for (const auto i : c10::irange(params.size())) {
    scalars.push_back(flags.adapts(params[i]) ? lars_vjp_scalars(lr, flags.eta, sums[i][0], sums[i][1], sums[i][2])
                                              : LarsVjpScalars{false, 0.0, -lr});
  }
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lars_vjp_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      const at::Tensor& p = params[k.tensor];
      const LarsVjpScalars& s = scalars[k.tensor];
      scalar_t* target = out[k.tensor].data_ptr<scalar_t>() + k.offset;
      const scalar_t* v = data<scalar_t>(vectors[k.tensor], k.offset);
      if (!s.project) {
        loops.scale(target, v, s.factor, k.size, stream);
        return;
      }
      with_bool(flags.decays(p), [&](auto D) {
        loops.template lars_vjp<scalar_t, decltype(D)::value>(
            target, data<scalar_t>(p, k.offset), data<scalar_t>(grads[k.tensor], k.offset), v, k.size,
            flags.weight_decay, s.projection, s.factor, stream);
      });
    });
  });
}

void adamw_step_into(
    Cpu, at::TensorList out, at::TensorList params, at::TensorList grads, const AdamwState& state,
    at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps, double weight_decay) {
  const std::vector<AdamwScalars> scalars = adamw_scalars_per_tensor(steps, lr, beta1, beta2, eps, weight_decay);
  const std::vector<Chunk> chunks = make_chunks(params);
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_adamw_step_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      const std::optional<at::Tensor>& m = state.exp_avg[k.tensor];
      with_bool(m.has_value(), [&](auto S) {
        loops.template adamw_step<scalar_t, decltype(S)::value>(
            out[k.tensor].data_ptr<scalar_t>() + k.offset, data<scalar_t>(params[k.tensor], k.offset),
            data<scalar_t>(grads[k.tensor], k.offset), data_or_null<scalar_t>(m, k.offset),
            data_or_null<scalar_t>(state.exp_avg_sq[k.tensor], k.offset), k.size, scalars[k.tensor], stream);
      });
    });
  });
}

void adamw_vjp_into(
    Cpu, at::TensorList out, at::TensorList grads, const AdamwState& state, at::ArrayRef<double> steps,
    at::TensorList vectors, double lr, double beta1, double beta2, double eps) {
  const std::vector<AdamwScalars> scalars = adamw_scalars_per_tensor(steps, lr, beta1, beta2, eps, 0.0);
  const std::vector<Chunk> chunks = make_chunks(grads);
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "adamw_vjp_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      const std::optional<at::Tensor>& m = state.exp_avg[k.tensor];
      with_bool(m.has_value(), [&](auto S) {
        loops.template adamw_vjp<scalar_t, decltype(S)::value>(
            out[k.tensor].data_ptr<scalar_t>() + k.offset, data<scalar_t>(grads[k.tensor], k.offset),
            data_or_null<scalar_t>(m, k.offset), data_or_null<scalar_t>(state.exp_avg_sq[k.tensor], k.offset),
            data<scalar_t>(vectors[k.tensor], k.offset), k.size, scalars[k.tensor], stream);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CPU, m) {
  register_optimizer_ops<Cpu>(m);
}

}  // namespace metamask_fast
