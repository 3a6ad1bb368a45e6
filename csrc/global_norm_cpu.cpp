// CPU kernel of metamask_fast::global_norm: sqrt(sum_i sum_j t_i[j]^2) over a list of tensors, in one pass.
//
// Accumulation is in float64 for every input dtype: the pass is memory bound, so the wider sum costs
// nothing measurable, and the result is then the exact norm rounded once to the output dtype for any
// realistic size (no float32 overflow of squares above ~1.8e19 either). The CUDA kernel uses float32 for
// the narrower dtypes instead; see cuda/global_norm_cuda.cu.

// Per-operator headers instead of ATen/ATen.h: they compile several times faster.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_chunks.h"
#include "cpu_loops.h"
#include "tensor_list_checks.h"

namespace metamask_fast {
namespace {

// Chunks (cpu_chunks.h) are the unit of parallel work. Their partial sums are added in chunk order, so the
// result does not depend on the number of threads.

at::Tensor global_norm_cpu(at::TensorList tensors) {
  check_tensor_list("global_norm", "tensors", tensors);

  // A dense tensor (contiguous, channels_last, ...) is read as the flat array it is; others through a
  // contiguous copy.
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    contiguous.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  const std::vector<Chunk> chunks = make_chunks(tensors);

  std::vector<double> partial(chunks.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "global_norm_cpu", [&] {
    with_cpu_loops([&](auto loops) {
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
        for (const auto c : c10::irange(begin, end)) {
          const at::Tensor& t = contiguous[chunks[c].tensor];
          partial[c] = loops.sum_of_squares(t.const_data_ptr<scalar_t>() + chunks[c].offset, chunks[c].size);
        }
      });
    });
  });

  double total = 0.0;
  for (const double p : partial) {
    total += p;
  }
  // Made in double and converted as a tensor: a norm beyond the dtype's range becomes inf, as in the
  // fallback (scalar_tensor of a float dtype refuses a double it cannot represent).
  return at::scalar_tensor(std::sqrt(total), tensors[0].options().dtype(at::kDouble)).to(tensors[0].scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(metamask_fast, CPU, m) {
  m.impl("global_norm", &global_norm_cpu);
}

}  // namespace metamask_fast
