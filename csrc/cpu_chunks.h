// The work split of the CPU multi-tensor kernels: the elements of all tensors of a list, concatenated, cut
// into chunks of at most kChunk elements that never cross a tensor boundary. at::parallel_for hands out
// chunk ranges, so one parallel loop covers a whole parameter list (small tensors included) and the
// result never depends on the number of threads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <vector>

namespace metamask_fast {

constexpr int64_t kChunk = int64_t{1} << 16;

struct Chunk {
  size_t tensor;   // index into the list
  int64_t offset;  // first element of the chunk in that tensor
  int64_t size;    // number of elements, 1..kChunk
};

inline std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (const auto i : c10::irange(tensors.size())) {
    const int64_t numel = tensors[i].numel();
    for (int64_t offset = 0; offset < numel; offset += kChunk) {
      chunks.push_back({i, offset, std::min(kChunk, numel - offset)});
    }
  }
  return chunks;
}

}  // namespace metamask_fast
