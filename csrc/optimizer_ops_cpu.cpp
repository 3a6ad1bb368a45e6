// CPU kernels of the optimizers' virtual updates and their vector-Jacobian products: metamask_fast::
// virtual_sgd_step.out, virtual_lars_step, virtual_adamw_step, sgd_vjp, lars_vjp, adamw_vjp (each also .out).
//
// Like multi_tensor_ops_cpu.cpp: one at::parallel_for over the chunks of all tensors (cpu_chunks.h), the inner
// loops of cpu_loops.h. LARS needs per-tensor sums first (‖θ‖², ‖d‖², and ⟨d, v⟩ for its VJP): one parallel
// pass writes each chunk's float64 partial sums, which are added per tensor in chunk order (so the result
// does not depend on the number of threads), then a second pass writes the outputs. The arithmetic is that of
// the PyTorch fallbacks in metamask_fast/optim_ops.py, operation for operation.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
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

// Runs body(loops, chunk) over every chunk of `chunks`, in parallel, for the dtype of `dtype_of`.
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

std::vector<at::Tensor> empty_like_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    out.push_back(at::empty_like(t));  // dense inputs: the same strides
  }
  return out;
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t, int64_t offset) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() + offset : nullptr;
}

template <typename scalar_t>
const scalar_t* data(const at::Tensor& t, int64_t offset) {
  return t.const_data_ptr<scalar_t>() + offset;
}

// ------------------------------------------------------------------------------------------------ SGD

void virtual_sgd_step_out_cpu(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov, at::TensorList out) {
  const char* op = "virtual_sgd_step";
  const auto buffer = check_virtual_sgd_step(op, params, grads, buffers);
  const std::vector<at::Tensor> buffer_list = as_tensors(buffer);
  check_separate_out(op, "params", params, out, {{"params", params}, {"grads", grads}, {"buffers", buffer_list}});
  const SgdCoefficients c{lr, momentum, dampening, weight_decay, nesterov};
  const bool decay = weight_decay != 0, use_momentum = momentum != 0;
  const std::vector<Chunk> chunks = make_chunks(params);
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_sgd_step_out_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      const scalar_t* b = use_momentum ? data_or_null<scalar_t>(buffer[k.tensor], k.offset) : nullptr;
      with_bool(decay, [&](auto D) {
        with_bool(use_momentum, [&](auto M) {
          with_bool(b != nullptr, [&](auto B) {
            with_bool(nesterov && use_momentum, [&](auto N) {
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
void scale_into(at::TensorList out, at::TensorList tensors, const std::vector<double>& factors) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  const bool stream = use_streaming_stores(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "scale_cpu", [&] {
    for_each_chunk(chunks, [&](auto loops, const Chunk& k) {
      loops.scale(out[k.tensor].data_ptr<scalar_t>() + k.offset, data<scalar_t>(tensors[k.tensor], k.offset),
                  factors[k.tensor], k.size, stream);
    });
  });
}

std::vector<double> checked_sgd_vjp_factors(
    const char* op, at::TensorList vectors, const c10::List<std::optional<at::Tensor>>& buffers, double lr,
    double momentum, double dampening, bool nesterov, std::vector<at::Tensor>& buffer_list) {
  check_tensor_list(op, "vectors", vectors);
  check_dense(op, "vectors", vectors);
  const auto buffer = check_optional_like(op, "vectors", vectors, "buffers", buffers);
  buffer_list = as_tensors(buffer);
  std::vector<double> factors;
  for (const auto& b : buffer) {
    factors.push_back(sgd_vjp_factor(lr, momentum, dampening, nesterov, b.has_value()));
  }
  return factors;
}

std::vector<at::Tensor> sgd_vjp_cpu(
    at::TensorList vectors, const c10::List<std::optional<at::Tensor>>& buffers, double lr, double momentum,
    double dampening, bool nesterov) {
  std::vector<at::Tensor> buffer_list;
  const auto factors = checked_sgd_vjp_factors("sgd_vjp", vectors, buffers, lr, momentum, dampening, nesterov, buffer_list);
  std::vector<at::Tensor> out = empty_like_all(vectors);
  scale_into(out, vectors, factors);
  return out;
}

void sgd_vjp_out_cpu(
    at::TensorList vectors, const c10::List<std::optional<at::Tensor>>& buffers, double lr, double momentum,
    double dampening, bool nesterov, at::TensorList out) {
  std::vector<at::Tensor> buffer_list;
  const auto factors = checked_sgd_vjp_factors("sgd_vjp", vectors, buffers, lr, momentum, dampening, nesterov, buffer_list);
  check_separate_out("sgd_vjp", "vectors", vectors, out, {{"vectors", vectors}, {"buffers", buffer_list}});
  scale_into(out, vectors, factors);
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

void check_lars_step(
    const char* op, at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers,
    std::vector<std::optional<at::Tensor>>& buffer) {
  buffer = check_virtual_sgd_step(op, params, grads, buffers);
}

void lars_step_into(
    at::TensorList out, at::TensorList params, at::TensorList grads, const std::vector<std::optional<at::Tensor>>& buffer,
    double lr, double momentum, const LarsFlags& flags) {
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

std::vector<at::Tensor> virtual_lars_step_cpu(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers, double lr,
    double weight_decay, double momentum, double eta, bool weight_decay_filter, bool lars_adaptation_filter) {
  std::vector<std::optional<at::Tensor>> buffer;
  check_lars_step("virtual_lars_step", params, grads, buffers, buffer);
  std::vector<at::Tensor> out = empty_like_all(params);
  lars_step_into(out, params, grads, buffer, lr, momentum,
                 LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
  return out;
}

void virtual_lars_step_out_cpu(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers, double lr,
    double weight_decay, double momentum, double eta, bool weight_decay_filter, bool lars_adaptation_filter,
    at::TensorList out) {
  const char* op = "virtual_lars_step";
  std::vector<std::optional<at::Tensor>> buffer;
  check_lars_step(op, params, grads, buffers, buffer);
  const std::vector<at::Tensor> buffer_list = as_tensors(buffer);
  check_separate_out(op, "params", params, out, {{"params", params}, {"grads", grads}, {"buffers", buffer_list}});
  lars_step_into(out, params, grads, buffer, lr, momentum,
                 LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
}

void check_lars_vjp(const char* op, at::TensorList params, at::TensorList grads, at::TensorList vectors) {
  check_tensor_list(op, "params", params);
  check_pairwise_like(op, "params", params, "grads", grads);
  check_pairwise_like(op, "params", params, "vectors", vectors);
  check_dense(op, "params", params);
  check_same_strides(op, "params", params, "grads", grads);
  check_same_strides(op, "params", params, "vectors", vectors);
}

void lars_vjp_into(
    at::TensorList out, at::TensorList params, at::TensorList grads, at::TensorList vectors, double lr,
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

std::vector<at::Tensor> lars_vjp_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList vectors, double lr, double weight_decay, double eta,
    bool weight_decay_filter, bool lars_adaptation_filter) {
  check_lars_vjp("lars_vjp", params, grads, vectors);
  std::vector<at::Tensor> out = empty_like_all(params);
  lars_vjp_into(out, params, grads, vectors, lr, LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
  return out;
}

void lars_vjp_out_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList vectors, double lr, double weight_decay, double eta,
    bool weight_decay_filter, bool lars_adaptation_filter, at::TensorList out) {
  const char* op = "lars_vjp";
  check_lars_vjp(op, params, grads, vectors);
  check_separate_out(op, "params", params, out, {{"params", params}, {"grads", grads}, {"vectors", vectors}});
  lars_vjp_into(out, params, grads, vectors, lr, LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
}

// ---------------------------------------------------------------------------------------------- AdamW

struct AdamwState {
  std::vector<std::optional<at::Tensor>> exp_avg, exp_avg_sq;
  std::vector<at::Tensor> exp_avg_list, exp_avg_sq_list;
};

AdamwState check_adamw_state(
    const char* op, const char* ref_name, at::TensorList ref, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps) {
  AdamwState state;
  state.exp_avg = check_optional_like(op, ref_name, ref, "exp_avgs", exp_avgs);
  state.exp_avg_sq = check_optional_like(op, ref_name, ref, "exp_avg_sqs", exp_avg_sqs);
  check_moments_paired(op, state.exp_avg, state.exp_avg_sq);
  check_steps(op, ref, steps);
  state.exp_avg_list = as_tensors(state.exp_avg);
  state.exp_avg_sq_list = as_tensors(state.exp_avg_sq);
  return state;
}

AdamwState check_adamw_step(
    const char* op, at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps) {
  check_tensor_list(op, "params", params);
  check_pairwise_like(op, "params", params, "grads", grads);
  check_dense(op, "params", params);
  check_same_strides(op, "params", params, "grads", grads);
  return check_adamw_state(op, "params", params, exp_avgs, exp_avg_sqs, steps);
}

void adamw_step_into(
    at::TensorList out, at::TensorList params, at::TensorList grads, const AdamwState& state,
    at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps, double weight_decay) {
  std::vector<AdamwScalars> scalars;
  for (const double step : steps) {
    scalars.push_back(adamw_scalars(step, lr, beta1, beta2, eps, weight_decay));
  }
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

std::vector<at::Tensor> virtual_adamw_step_cpu(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps, double lr, double beta1,
    double beta2, double eps, double weight_decay) {
  const AdamwState state = check_adamw_step("virtual_adamw_step", params, grads, exp_avgs, exp_avg_sqs, steps);
  std::vector<at::Tensor> out = empty_like_all(params);
  adamw_step_into(out, params, grads, state, steps, lr, beta1, beta2, eps, weight_decay);
  return out;
}

void virtual_adamw_step_out_cpu(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps, double lr, double beta1,
    double beta2, double eps, double weight_decay, at::TensorList out) {
  const char* op = "virtual_adamw_step";
  const AdamwState state = check_adamw_step(op, params, grads, exp_avgs, exp_avg_sqs, steps);
  check_separate_out(
      op, "params", params, out,
      {{"params", params}, {"grads", grads}, {"exp_avgs", state.exp_avg_list}, {"exp_avg_sqs", state.exp_avg_sq_list}});
  adamw_step_into(out, params, grads, state, steps, lr, beta1, beta2, eps, weight_decay);
}

AdamwState check_adamw_vjp(
    const char* op, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps, at::TensorList vectors) {
  check_tensor_list(op, "grads", grads);
  check_pairwise_like(op, "grads", grads, "vectors", vectors);
  check_dense(op, "grads", grads);
  check_same_strides(op, "grads", grads, "vectors", vectors);
  return check_adamw_state(op, "grads", grads, exp_avgs, exp_avg_sqs, steps);
}

void adamw_vjp_into(
    at::TensorList out, at::TensorList grads, const AdamwState& state, at::ArrayRef<double> steps,
    at::TensorList vectors, double lr, double beta1, double beta2, double eps) {
  std::vector<AdamwScalars> scalars;
  for (const double step : steps) {
    scalars.push_back(adamw_scalars(step, lr, beta1, beta2, eps, 0.0));
  }
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

std::vector<at::Tensor> adamw_vjp_cpu(
    at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps, at::TensorList vectors,
    double lr, double beta1, double beta2, double eps) {
  const AdamwState state = check_adamw_vjp("adamw_vjp", grads, exp_avgs, exp_avg_sqs, steps, vectors);
  std::vector<at::Tensor> out = empty_like_all(grads);
  adamw_vjp_into(out, grads, state, steps, vectors, lr, beta1, beta2, eps);
  return out;
}

void adamw_vjp_out_cpu(
    at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps, at::TensorList vectors,
    double lr, double beta1, double beta2, double eps, at::TensorList out) {
  const char* op = "adamw_vjp";
  const AdamwState state = check_adamw_vjp(op, grads, exp_avgs, exp_avg_sqs, steps, vectors);
  check_separate_out(
      op, "grads", grads, out,
      {{"grads", grads}, {"exp_avgs", state.exp_avg_list}, {"exp_avg_sqs", state.exp_avg_sq_list},
       {"vectors", vectors}});
  adamw_vjp_into(out, grads, state, steps, vectors, lr, beta1, beta2, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CPU, m) {
  m.impl("virtual_sgd_step.out", &virtual_sgd_step_out_cpu);
  m.impl("virtual_lars_step", &virtual_lars_step_cpu);
  m.impl("virtual_lars_step.out", &virtual_lars_step_out_cpu);
  m.impl("virtual_adamw_step", &virtual_adamw_step_cpu);
  m.impl("virtual_adamw_step.out", &virtual_adamw_step_out_cpu);
  m.impl("sgd_vjp", &sgd_vjp_cpu);
  m.impl("sgd_vjp.out", &sgd_vjp_out_cpu);
  m.impl("lars_vjp", &lars_vjp_cpu);
  m.impl("lars_vjp.out", &lars_vjp_out_cpu);
  m.impl("adamw_vjp", &adamw_vjp_cpu);
  m.impl("adamw_vjp.out", &adamw_vjp_out_cpu);
}

}  // namespace metamask_fast
