// CPU kernels of the meta-step sweeps: metamask_fast::add_scaled_, add_scaled and virtual_sgd_step.
//
// Each op is one at::parallel_for over the chunks of all tensors of its lists (cpu_chunks.h), running the
// inner loops of cpu_loops.h (float16 and bfloat16 computed in float32). The arithmetic is the one of the
// PyTorch fallbacks in metamask_fast/ops.py and of torch.optim.SGD, operation for operation, so results
// agree to rounding.

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
#include "cpu_loops.h"
#include "tensor_list_checks.h"

namespace metamask_fast {
namespace {

// One chunk of the virtual step with the loop of `loops` (cpu_loops.h) for these switches.
template <typename scalar_t, typename Loops>
void virtual_sgd_chunk(
    Loops loops, scalar_t* out, const scalar_t* theta, const scalar_t* grad, const scalar_t* buffer, int64_t n,
    const SgdCoefficients& c, bool stream) {
  const bool decay = c.weight_decay != 0, momentum = c.momentum != 0, has_buffer = buffer != nullptr;
  auto run = [&](auto decay_t, auto momentum_t, auto buffer_t, auto nesterov_t) {
    loops.template sgd<scalar_t, decltype(decay_t)::value, decltype(momentum_t)::value, decltype(buffer_t)::value,
                       decltype(nesterov_t)::value>(out, theta, grad, buffer, n, c, stream);
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

// outs[i] = tensors[i] + alpha * others[i] over all chunks; outs may be tensors (in place).
void add_scaled_into(at::TensorList outs, at::TensorList tensors, at::TensorList others, double alpha) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  const bool stream = use_streaming_stores(outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "add_scaled_cpu", [&] {
    with_cpu_loops([&](auto loops) {
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
        for (const auto c : c10::irange(begin, end)) {
          const Chunk& k = chunks[c];
          loops.add_scaled(
              outs[k.tensor].data_ptr<scalar_t>() + k.offset, tensors[k.tensor].const_data_ptr<scalar_t>() + k.offset,
              others[k.tensor].const_data_ptr<scalar_t>() + k.offset, alpha, k.size, stream);
        }
      });
    });
  });
}

void add_scaled__cpu(at::TensorList tensors, at::TensorList others, double alpha) {
  check_add_scaled("add_scaled_", tensors, others);
  check_add_scaled_in_place_aliasing("add_scaled_", tensors, others);
  add_scaled_into(tensors, tensors, others, alpha);
}

void add_scaled_out_cpu(at::TensorList tensors, at::TensorList others, double alpha, at::TensorList out) {
  check_add_scaled_out("add_scaled", tensors, others, out);
  add_scaled_into(out, tensors, others, alpha);
}

std::vector<at::Tensor> add_scaled_cpu(at::TensorList tensors, at::TensorList others, double alpha) {
  check_add_scaled("add_scaled", tensors, others);
  std::vector<at::Tensor> outs;
  outs.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    outs.push_back(at::empty_like(t));  // dense inputs: the same strides
  }
  add_scaled_into(outs, tensors, others, alpha);
  return outs;
}

std::vector<at::Tensor> virtual_sgd_step_cpu(
    at::TensorList params, at::TensorList grads, const c10::List<std::optional<at::Tensor>>& buffers, double lr,
    double momentum, double dampening, double weight_decay, bool nesterov) {
  const std::vector<std::optional<at::Tensor>> buffer =
      check_virtual_sgd_step("virtual_sgd_step", params, grads, buffers);
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const at::Tensor& p : params) {
    outs.push_back(at::empty_like(p));
  }
  const SgdCoefficients coefficients{lr, momentum, dampening, weight_decay, nesterov};
  const std::vector<Chunk> chunks = make_chunks(params);
  const bool stream = use_streaming_stores(outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "virtual_sgd_step_cpu", [&] {
    with_cpu_loops([&](auto loops) {
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
        for (const auto c : c10::irange(begin, end)) {
          const Chunk& k = chunks[c];
          const std::optional<at::Tensor>& b = buffer[k.tensor];
          virtual_sgd_chunk(
              loops, outs[k.tensor].data_ptr<scalar_t>() + k.offset,
              params[k.tensor].const_data_ptr<scalar_t>() + k.offset, grads[k.tensor].const_data_ptr<scalar_t>() + k.offset,
              b.has_value() ? b->const_data_ptr<scalar_t>() + k.offset : nullptr, k.size, coefficients, stream);
        }
      });
    });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CPU, m) {
  m.impl("add_scaled_", &add_scaled__cpu);
  m.impl("add_scaled", &add_scaled_cpu);
  m.impl("add_scaled.out", &add_scaled_out_cpu);
  m.impl("virtual_sgd_step", &virtual_sgd_step_cpu);
}

}  // namespace metamask_fast
