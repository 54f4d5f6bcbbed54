// CPU-built test hooks for the host code of the CUDA path (tensor_table.h): the table the CUDA
// kernels read and the cache that keeps uploaded tables, exposed as ops so that the tests check
// exactly the code the CUDA path runs, without a GPU. Not part of the optimizer's API.
#include <torch/library.h>

#include <vector>

#include "engine_cuda.h"
#include "tensor_table.h"

namespace ff {
namespace {

// The words of the tensor table of tensors with these addresses and sizes, cut into `chunk`-element blocks.
std::vector<int64_t> tensor_table_op(std::vector<int64_t> p, std::vector<int64_t> g, std::vector<int64_t> numels,
                                     int64_t chunk) {
  TORCH_CHECK(p.size() == numels.size() && g.size() == numels.size(), "fromage_fused: one address pair per size");
  TORCH_CHECK(chunk > 0, "fromage_fused: chunk must be positive");
  std::vector<TensorRef> refs(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK(numels[i] >= 0, "fromage_fused: sizes must be >= 0");
    refs[i].ptr[0] = reinterpret_cast<const void*>(static_cast<uintptr_t>(p[i]));
    refs[i].ptr[1] = reinterpret_cast<const void*>(static_cast<uintptr_t>(g[i]));
    refs[i].numel = numels[i];
  }
  std::vector<int64_t> words;
  build_tensor_table(refs.data(), static_cast<int64_t>(refs.size()), 2, chunk, words);
  return words;
}

// Replays accesses on a cache of `capacity` entries: access i looks up key keys[i] (inserting it on
// a miss) with capture on when capturing[i] != 0. Returns one hit flag (1/0) per access, then the
// final entries from the least to the most recently used as (key, held) pairs.
std::vector<int64_t> table_cache_trace_op(int64_t capacity, std::vector<int64_t> keys, std::vector<int64_t> capturing) {
  TORCH_CHECK(capacity > 0 && keys.size() == capturing.size(), "fromage_fused: one capture flag per key");
  TableCache<int64_t> cache(static_cast<size_t>(capacity));
  std::vector<int64_t> out;
  for (size_t i = 0; i < keys.size(); ++i) {
    const std::vector<int64_t> key{keys[i]};
    const bool hit = cache.find(key, capturing[i] != 0) != nullptr;
    if (!hit) cache.insert(key, keys[i], capturing[i] != 0);
    out.push_back(hit ? 1 : 0);
  }
  const auto entries = cache.describe();
  out.insert(out.end(), entries.begin(), entries.end());
  return out;
}

}  // namespace
}  // namespace ff

TORCH_LIBRARY_FRAGMENT(fromage_fused, m) {
  m.def("_cuda_tensor_table(int[] p, int[] g, int[] numels, int chunk) -> int[]", &ff::tensor_table_op);
  m.def("_table_cache_trace(int capacity, int[] keys, int[] capturing) -> int[]", &ff::table_cache_trace_op);
}
