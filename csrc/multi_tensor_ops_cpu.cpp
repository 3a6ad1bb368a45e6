// CPU kernels of the meta-step sweeps: metamask_fast::add_scaled_, add_scaled and virtual_sgd_step.
//
// Each op is one at::parallel_for over the chunks of all tensors of its lists (cpu_chunks.h), with a plain
// inner loop that the compiler vectorises. float16 and bfloat16 are computed in float32
// ("opmath") and rounded once per element. The arithmetic is the one of the PyTorch fallbacks in
// metamask_fast/ops.py and of torch.optim.SGD, operation for operation, so results agree to rounding.

// Per-operator headers instead of ATen/ATen.h: they compile several times faster.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_chunks.h"
#include "tensor_list_checks.h"

namespace metamask_fast {
namespace {

// out[j] = x[j] + alpha * y[j]; out may be x. Plain loops that GCC vectorises at -O3: an extension build
// lacks the CPU_CAPABILITY dispatch that makes at::vec::Vectorized wide in ATen's own kernels.
template <typename scalar_t>
void add_scaled_chunk(scalar_t* out, const scalar_t* x, const scalar_t* __restrict__ y, double alpha, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto a = static_cast<opmath_t>(alpha);
  if (out == x) {  // in place: one pointer read and written, so the loop needs no aliasing check
    scalar_t* __restrict__ inout = out;
    for (int64_t j = 0; j < n; ++j) {
      inout[j] = static_cast<scalar_t>(static_cast<opmath_t>(inout[j]) + a * static_cast<opmath_t>(y[j]));
    }
    return;
  }
  scalar_t* __restrict__ target = out;
  for (int64_t j = 0; j < n; ++j) {
    target[j] = static_cast<scalar_t>(static_cast<opmath_t>(x[j]) + a * static_cast<opmath_t>(y[j]));
  }
}

// torch.optim.SGD's update, in its order: d = g + wd θ; b' = μ b + (1 - dampening) d, or d without a
// buffer; u = d + μ b' (Nesterov) or b'; θ' = θ - lr u. Without momentum u = d.
struct SgdCoefficients {
  double lr, momentum, dampening, weight_decay;
  bool nesterov;
};

// One loop per combination of the chunk-uniform switches, so each inner loop is branch-free and vectorises.
template <typename scalar_t, bool kDecay, bool kMomentum, bool kBuffer, bool kNesterov>
void sgd_loop(scalar_t* out, const scalar_t* theta, const scalar_t* grad, const scalar_t* buffer, int64_t n,
              const SgdCoefficients& c) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto wd = static_cast<opmath_t>(c.weight_decay);
  const auto mu = static_cast<opmath_t>(c.momentum);
  const auto keep = static_cast<opmath_t>(1 - c.dampening);
  const auto neg_lr = static_cast<opmath_t>(-c.lr);
  for (int64_t j = 0; j < n; ++j) {
    const auto t = static_cast<opmath_t>(theta[j]);
    opmath_t d = static_cast<opmath_t>(grad[j]);
    if constexpr (kDecay) d = d + wd * t;
    opmath_t update = d;
    if constexpr (kMomentum) {
      opmath_t moved = d;
      if constexpr (kBuffer) moved = static_cast<opmath_t>(buffer[j]) * mu + keep * d;
      update = kNesterov ? d + mu * moved : moved;
    }
    out[j] = static_cast<scalar_t>(t + neg_lr * update);
  }
}

template <typename scalar_t>
void virtual_sgd_chunk(
    scalar_t* out, const scalar_t* theta, const scalar_t* grad, const scalar_t* buffer, int64_t n,
    const SgdCoefficients& c) {
  const bool decay = c.weight_decay != 0, momentum = c.momentum != 0, has_buffer = buffer != nullptr;
  auto run = [&](auto decay_t, auto momentum_t, auto buffer_t, auto nesterov_t) {
    sgd_loop<scalar_t, decltype(decay_t)::value, decltype(momentum_t)::value, decltype(buffer_t)::value,
             decltype(nesterov_t)::value>(out, theta, grad, buffer, n, c);
  };
  using T = std::true_type;
  using F = std::false_type;
  if (!momentum) {
    decay ? run(T{}, F{}, F{}, F{}) : run(F{}, F{}, F{}, F{});
  } else if (has_buffer) {
    if (c.nesterov) {
      decay ? run(T{}, T{}, T{}, T{}) : run(F{}, T{}, T{}, T{});
    } else {
      decay ? run(T{}, T{}, T{}, F{}) : run(F{}, T{}, T{}, F{});
    }
  } else if (c.nesterov) {
    decay ? run(T{}, T{}, F{}, T{}) : run(F{}, T{}, F{}, T{});
  } else {
    decay ? run(T{}, T{}, F{}, F{}) : run(F{}, T{}, F{}, F{});
  }
}

void check_add_scaled(const char* op, at::TensorList tensors, at::TensorList others) {
  check_tensor_list(op, "tensors", tensors);
  check_pairwise_like(op, "tensors", tensors, "others", others);
  check_contiguous(op, "tensors", tensors);
  check_contiguous(op, "others", others);
}

// outs[i] = tensors[i] + alpha * others[i] over all chunks; outs may be tensors (in place).
void add_scaled_into(at::TensorList outs, at::TensorList tensors, at::TensorList others, double alpha) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "add_scaled_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (const auto c : c10::irange(begin, end)) {
        const Chunk& k = chunks[c];
        add_scaled_chunk(
            outs[k.tensor].data_ptr<scalar_t>() + k.offset, tensors[k.tensor].const_data_ptr<scalar_t>() + k.offset,
            others[k.tensor].const_data_ptr<scalar_t>() + k.offset, alpha, k.size);
      }
    });
  });
}

void add_scaled__cpu(at::TensorList tensors, at::TensorList others, double alpha) {
  check_add_scaled("add_scaled_", tensors, others);
  add_scaled_into(tensors, tensors, others, alpha);
}

std::vector<at::Tensor> add_scaled_cpu(at::TensorList tensors, at::TensorList others, double alpha) {
  check_add_scaled("add_scaled", tensors, others);
  std::vector<at::Tensor> outs;
  outs.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    outs.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  }
  add_scaled_into(outs, tensors, others, alpha);
  return outs;
}

std::vector<at::Tensor> virtual_sgd_step_cpu(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov) {
  constexpr const char* op = "virtual_sgd_step";
  check_tensor_list(op, "params", params);
  check_pairwise_like(op, "params", params, "grads", grads);
  check_contiguous(op, "params", params);
  check_contiguous(op, "grads", grads);
  TORCH_CHECK_VALUE(
      buffers.size() == params.size(), op, ": `buffers` must be as long as `params` (None where no buffer), got ",
      buffers.size(), " and ", params.size());
  std::vector<at::Tensor> present;  // the buffers that exist, checked like the params they belong to
  std::vector<at::Tensor> present_params;
  std::vector<const at::Tensor*> buffer_of(params.size(), nullptr);
  for (const auto i : c10::irange(params.size())) {
    const std::optional<at::Tensor> b = buffers[i];
    if (b.has_value() && b->defined()) {
      present.push_back(*b);
      present_params.push_back(params[i]);
    }
  }
  check_pairwise_like(op, "params", present_params, "buffers", present);
  check_contiguous(op, "buffers", present);
  for (size_t i = 0, k = 0; i < params.size(); ++i) {
    const std::optional<at::Tensor> b = buffers[i];
    if (b.has_value() && b->defined()) {
      buffer_of[i] = &present[k++];
    }
  }

  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const at::Tensor& p : params) {
    outs.push_back(at::empty_like(p, at::MemoryFormat::Contiguous));
  }
  const SgdCoefficients coefficients{lr, momentum, dampening, weight_decay, nesterov};
  const std::vector<Chunk> chunks = make_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_sgd_step_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (const auto c : c10::irange(begin, end)) {
        const Chunk& k = chunks[c];
        const at::Tensor* buffer = buffer_of[k.tensor];
        virtual_sgd_chunk(
            outs[k.tensor].data_ptr<scalar_t>() + k.offset, params[k.tensor].const_data_ptr<scalar_t>() + k.offset,
            grads[k.tensor].const_data_ptr<scalar_t>() + k.offset,
            buffer != nullptr ? buffer->const_data_ptr<scalar_t>() + k.offset : nullptr, k.size, coefficients);
      }
    });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CPU, m) {
  m.impl("add_scaled_", &add_scaled__cpu);
  m.impl("add_scaled", &add_scaled_cpu);
  m.impl("virtual_sgd_step", &virtual_sgd_step_cpu);
}

}  // namespace metamask_fast
