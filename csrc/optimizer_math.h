// The host-side scalars of the optimizers' virtual updates and vector-Jacobian products, shared by the CPU
// (optimizer_ops_cpu.cpp) and CUDA (cuda/optimizer_ops_cuda.cu) kernels: computed in float64 once per tensor,
// as the PyTorch fallbacks in metamask_fast/optim_ops.py compute them in Python floats.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <vector>

namespace metamask_fast {

// torch.optim.SGD's options.
struct SgdCoefficients {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
};

// SGD: u = f v with f = -lr c, c the weight of the gradient in the step (1 - dampening with a momentum buffer,
// 1 + momentum (1 - dampening) with nesterov; before the first step 1, or 1 + momentum with nesterov; 1
// without momentum).
inline double sgd_vjp_factor(double lr, double momentum, double dampening, bool nesterov, bool has_buffer) {
  double c = 1.0;
  if (momentum != 0) {
    if (!has_buffer) {
      c = nesterov ? 1.0 + momentum : 1.0;
    } else {
      c = nesterov ? 1.0 + momentum * (1.0 - dampening) : 1.0 - dampening;
    }
  }
  return -lr * c;
}

// LARS's options, and which params they exempt: 1-d ones (biases, norms) under a filter.
struct LarsFlags {
  double weight_decay, eta;
  bool weight_decay_filter, lars_adaptation_filter;
  bool decays(const at::Tensor& p) const { return !(weight_decay_filter && p.dim() == 1); }
  bool adapts(const at::Tensor& p) const { return !(lars_adaptation_filter && p.dim() == 1); }
};

// q = eta ‖θ‖ / ‖d‖ when both norms are > 0, else 1, from the sums of squares. (Host and device: the CUDA
// kernels compute LARS's scalars on the GPU, from sums they keep there.)
C10_HOST_DEVICE inline double lars_trust_ratio(double eta, double theta_squares, double direction_squares) {
  const double theta_norm = ::sqrt(theta_squares), direction_norm = ::sqrt(direction_squares);
  return theta_norm > 0 && direction_norm > 0 ? eta * theta_norm / direction_norm : 1.0;
}

// LARS's vector-Jacobian product where the trust ratio applies: u = (v - d ⟨d, v⟩/‖d‖²) (-lr q) when both
// norms are > 0 (`project`), else u = -lr v.
struct LarsVjpScalars {
  bool project;
  double projection;  // ⟨d, v⟩ / ‖d‖²
  double factor;      // -lr q
};

C10_HOST_DEVICE inline LarsVjpScalars lars_vjp_scalars(
    double lr, double eta, double theta_squares, double direction_squares, double dot) {
  const double theta_norm = ::sqrt(theta_squares), direction_norm = ::sqrt(direction_squares);
  if (!(theta_norm > 0 && direction_norm > 0)) {
    return {false, 0.0, -lr};
  }
  const double q = eta * theta_norm / direction_norm;
  return {true, dot / direction_squares, q * -lr};
}

// AdamW's per-tensor scalars, with the step's bias corrections.
struct AdamwScalars {
  double beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  double decay;       // 1 - lr wd
  double step_size;   // -lr / (1 - beta1^step)
  double bias2;       // 1 - beta2^step
  double bias2_sqrt;  // sqrt(bias2)
};

inline AdamwScalars adamw_scalars(double step, double lr, double beta1, double beta2, double eps, double weight_decay) {
  const double bias1 = 1 - std::pow(beta1, step), bias2 = 1 - std::pow(beta2, step);
  return {beta1, beta2, 1 - beta1, 1 - beta2, eps, 1 - lr * weight_decay, -lr / bias1, bias2, std::sqrt(bias2)};
}

// adamw_scalars for each tensor's step number.
inline std::vector<AdamwScalars> adamw_scalars_per_tensor(
    at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps, double weight_decay) {
  std::vector<AdamwScalars> scalars;
  scalars.reserve(steps.size());
  for (const double step : steps) {
    scalars.push_back(adamw_scalars(step, lr, beta1, beta2, eps, weight_decay));
  }
  return scalars;
}

}  // namespace metamask_fast
