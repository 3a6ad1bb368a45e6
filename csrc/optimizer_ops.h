// The registered functions of the optimizer ops (virtual_sgd_step.out, virtual_lars_step, virtual_adamw_step,
// sgd_vjp, lars_vjp, adamw_vjp, each also .out), shared by the CPU and CUDA kernels: the argument checks, the
// outputs, then the backend's sweep. A backend (optimizer_ops_cpu.cpp, cuda/optimizer_ops_cuda.cu) defines a
// tag type and, found by argument-dependent lookup, check_device(tag, op, arg, tensors) and the sweeps
// sgd_step_into, scale_into, lars_step_into, lars_vjp_into, adamw_step_into and adamw_vjp_into, each taking the
// tag first; then it registers OptimizerOps<Tag> with register_optimizer_ops.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "optimizer_math.h"
#include "tensor_list_checks.h"

namespace metamask_fast {

inline std::vector<at::Tensor> empty_like_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    out.push_back(at::empty_like(t));  // dense inputs: the same strides
  }
  return out;
}

// AdamW's moments, checked: per param an optional tensor each, and the same as lists for the overlap checks.
struct AdamwState {
  std::vector<std::optional<at::Tensor>> exp_avg, exp_avg_sq;
  std::vector<at::Tensor> exp_avg_list, exp_avg_sq_list;
};

inline AdamwState check_adamw_state(
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

inline AdamwState check_adamw_step(
    const char* op, at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps) {
  check_tensor_list(op, "params", params);
  check_pairwise_like(op, "params", params, "grads", grads);
  check_dense(op, "params", params);
  check_same_strides(op, "params", params, "grads", grads);
  return check_adamw_state(op, "params", params, exp_avgs, exp_avg_sqs, steps);
}

inline AdamwState check_adamw_vjp(
    const char* op, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs, at::ArrayRef<double> steps, at::TensorList vectors) {
  check_tensor_list(op, "grads", grads);
  check_pairwise_like(op, "grads", grads, "vectors", vectors);
  check_dense(op, "grads", grads);
  check_same_strides(op, "grads", grads, "vectors", vectors);
  return check_adamw_state(op, "grads", grads, exp_avgs, exp_avg_sqs, steps);
}

inline void check_lars_vjp(const char* op, at::TensorList params, at::TensorList grads, at::TensorList vectors) {
  check_tensor_list(op, "params", params);
  check_pairwise_like(op, "params", params, "grads", grads);
  check_pairwise_like(op, "params", params, "vectors", vectors);
  check_dense(op, "params", params);
  check_same_strides(op, "params", params, "grads", grads);
  check_same_strides(op, "params", params, "vectors", vectors);
}

// sgd_vjp's arguments, checked, and its factor per tensor; `buffer_list`: the buffers for the overlap checks.
inline std::vector<double> checked_sgd_vjp_factors(
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

template <typename Tag>
struct OptimizerOps {
  using OptionalTensors = c10::List<std::optional<at::Tensor>>;

  static void virtual_sgd_step_out(
      at::TensorList params, at::TensorList grads, const OptionalTensors& buffers, double lr, double momentum,
      double dampening, double weight_decay, bool nesterov, at::TensorList out) {
    const char* op = "virtual_sgd_step";
    const auto buffer = check_virtual_sgd_step(op, params, grads, buffers);
    check_device(Tag{}, op, "params", params);
    const std::vector<at::Tensor> buffer_list = as_tensors(buffer);
    check_separate_out(op, "params", params, out, {{"params", params}, {"grads", grads}, {"buffers", buffer_list}});
    sgd_step_into(Tag{}, out, params, grads, buffer, SgdCoefficients{lr, momentum, dampening, weight_decay, nesterov});
  }

  static std::vector<at::Tensor> virtual_lars_step(
      at::TensorList params, at::TensorList grads, const OptionalTensors& buffers, double lr, double weight_decay,
      double momentum, double eta, bool weight_decay_filter, bool lars_adaptation_filter) {
    const auto buffer = checked_lars_step("virtual_lars_step", params, grads, buffers);
    std::vector<at::Tensor> out = empty_like_all(params);
    lars_step_into(Tag{}, out, params, grads, buffer, lr, momentum,
                   LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
    return out;
  }

  static void virtual_lars_step_out(
      at::TensorList params, at::TensorList grads, const OptionalTensors& buffers, double lr, double weight_decay,
      double momentum, double eta, bool weight_decay_filter, bool lars_adaptation_filter, at::TensorList out) {
    const char* op = "virtual_lars_step";
    const auto buffer = checked_lars_step(op, params, grads, buffers);
    const std::vector<at::Tensor> buffer_list = as_tensors(buffer);
    check_separate_out(op, "params", params, out, {{"params", params}, {"grads", grads}, {"buffers", buffer_list}});
    lars_step_into(Tag{}, out, params, grads, buffer, lr, momentum,
                   LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
  }

  static std::vector<at::Tensor> virtual_adamw_step(
      at::TensorList params, at::TensorList grads, const OptionalTensors& exp_avgs, const OptionalTensors& exp_avg_sqs,
      at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps, double weight_decay) {
    const char* op = "virtual_adamw_step";
    const AdamwState state = check_adamw_step(op, params, grads, exp_avgs, exp_avg_sqs, steps);
    check_device(Tag{}, op, "params", params);
    std::vector<at::Tensor> out = empty_like_all(params);
    adamw_step_into(Tag{}, out, params, grads, state, steps, lr, beta1, beta2, eps, weight_decay);
    return out;
  }

  static void virtual_adamw_step_out(
      at::TensorList params, at::TensorList grads, const OptionalTensors& exp_avgs, const OptionalTensors& exp_avg_sqs,
      at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps, double weight_decay,
      at::TensorList out) {
    const char* op = "virtual_adamw_step";
    const AdamwState state = check_adamw_step(op, params, grads, exp_avgs, exp_avg_sqs, steps);
    check_device(Tag{}, op, "params", params);
    check_separate_out(
        op, "params", params, out,
        {{"params", params}, {"grads", grads}, {"exp_avgs", state.exp_avg_list},
         {"exp_avg_sqs", state.exp_avg_sq_list}});
    adamw_step_into(Tag{}, out, params, grads, state, steps, lr, beta1, beta2, eps, weight_decay);
  }

  static std::vector<at::Tensor> sgd_vjp(
      at::TensorList vectors, const OptionalTensors& buffers, double lr, double momentum, double dampening,
      bool nesterov) {
    std::vector<at::Tensor> buffer_list;
    const auto factors = checked_sgd_vjp("sgd_vjp", vectors, buffers, lr, momentum, dampening, nesterov, buffer_list);
    std::vector<at::Tensor> out = empty_like_all(vectors);
    scale_into(Tag{}, out, vectors, factors);
    return out;
  }

  static void sgd_vjp_out(
      at::TensorList vectors, const OptionalTensors& buffers, double lr, double momentum, double dampening,
      bool nesterov, at::TensorList out) {
    std::vector<at::Tensor> buffer_list;
    const auto factors = checked_sgd_vjp("sgd_vjp", vectors, buffers, lr, momentum, dampening, nesterov, buffer_list);
    check_separate_out("sgd_vjp", "vectors", vectors, out, {{"vectors", vectors}, {"buffers", buffer_list}});
    scale_into(Tag{}, out, vectors, factors);
  }

  static std::vector<at::Tensor> lars_vjp(
      at::TensorList params, at::TensorList grads, at::TensorList vectors, double lr, double weight_decay, double eta,
      bool weight_decay_filter, bool lars_adaptation_filter) {
    check_lars_vjp("lars_vjp", params, grads, vectors);
    check_device(Tag{}, "lars_vjp", "params", params);
    std::vector<at::Tensor> out = empty_like_all(params);
    lars_vjp_into(Tag{}, out, params, grads, vectors, lr,
                  LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
    return out;
  }

  static void lars_vjp_out(
      at::TensorList params, at::TensorList grads, at::TensorList vectors, double lr, double weight_decay, double eta,
      bool weight_decay_filter, bool lars_adaptation_filter, at::TensorList out) {
    const char* op = "lars_vjp";
    check_lars_vjp(op, params, grads, vectors);
    check_device(Tag{}, op, "params", params);
    check_separate_out(op, "params", params, out, {{"params", params}, {"grads", grads}, {"vectors", vectors}});
    lars_vjp_into(Tag{}, out, params, grads, vectors, lr,
                  LarsFlags{weight_decay, eta, weight_decay_filter, lars_adaptation_filter});
  }

  static std::vector<at::Tensor> adamw_vjp(
      at::TensorList grads, const OptionalTensors& exp_avgs, const OptionalTensors& exp_avg_sqs,
      at::ArrayRef<double> steps, at::TensorList vectors, double lr, double beta1, double beta2, double eps) {
    const AdamwState state = check_adamw_vjp("adamw_vjp", grads, exp_avgs, exp_avg_sqs, steps, vectors);
    check_device(Tag{}, "adamw_vjp", "grads", grads);
    std::vector<at::Tensor> out = empty_like_all(grads);
    adamw_vjp_into(Tag{}, out, grads, state, steps, vectors, lr, beta1, beta2, eps);
    return out;
  }

  static void adamw_vjp_out(
      at::TensorList grads, const OptionalTensors& exp_avgs, const OptionalTensors& exp_avg_sqs,
      at::ArrayRef<double> steps, at::TensorList vectors, double lr, double beta1, double beta2, double eps,
      at::TensorList out) {
    const char* op = "adamw_vjp";
    const AdamwState state = check_adamw_vjp(op, grads, exp_avgs, exp_avg_sqs, steps, vectors);
    check_device(Tag{}, op, "grads", grads);
    check_separate_out(
        op, "grads", grads, out,
        {{"grads", grads}, {"exp_avgs", state.exp_avg_list}, {"exp_avg_sqs", state.exp_avg_sq_list},
         {"vectors", vectors}});
    adamw_vjp_into(Tag{}, out, grads, state, steps, vectors, lr, beta1, beta2, eps);
  }

 private:
  static std::vector<std::optional<at::Tensor>> checked_lars_step(
      const char* op, at::TensorList params, at::TensorList grads, const OptionalTensors& buffers) {
    auto buffer = check_virtual_sgd_step(op, params, grads, buffers);  // the same argument rules
    check_device(Tag{}, op, "params", params);
    return buffer;
  }

  static std::vector<double> checked_sgd_vjp(
      const char* op, at::TensorList vectors, const OptionalTensors& buffers, double lr, double momentum,
      double dampening, bool nesterov, std::vector<at::Tensor>& buffer_list) {
    auto factors = checked_sgd_vjp_factors(op, vectors, buffers, lr, momentum, dampening, nesterov, buffer_list);
    check_device(Tag{}, op, "vectors", vectors);
    return factors;
  }
};

template <typename Tag>
void register_optimizer_ops(torch::Library& m) {
  using Ops = OptimizerOps<Tag>;
  m.impl("virtual_sgd_step.out", &Ops::virtual_sgd_step_out);
  m.impl("virtual_lars_step", &Ops::virtual_lars_step);
  m.impl("virtual_lars_step.out", &Ops::virtual_lars_step_out);
  m.impl("virtual_adamw_step", &Ops::virtual_adamw_step);
  m.impl("virtual_adamw_step.out", &Ops::virtual_adamw_step_out);
  m.impl("sgd_vjp", &Ops::sgd_vjp);
  m.impl("sgd_vjp.out", &Ops::sgd_vjp_out);
  m.impl("lars_vjp", &Ops::lars_vjp);
  m.impl("lars_vjp.out", &Ops::lars_vjp_out);
  m.impl("adamw_vjp", &Ops::adamw_vjp);
  m.impl("adamw_vjp.out", &Ops::adamw_vjp_out);
}

}  // namespace metamask_fast
