// CPU-built test hooks for the host code of the CUDA path (tensor_table.h): the table the CUDA
// kernels read, the cache that keeps uploaded tables and the staging pool of captured uploads,
// exposed as ops so that the tests check exactly the code the CUDA path runs, without a GPU. Not
// part of the optimizer's API.
#include <torch/library.h>

#include <atomic>
#include <thread>
#include <vector>

#include "fromage_cuda.h"
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
    refs[i].p = reinterpret_cast<void*>(static_cast<uintptr_t>(p[i]));
    refs[i].g = reinterpret_cast<const void*>(static_cast<uintptr_t>(g[i]));
    refs[i].numel = numels[i];
  }
  std::vector<int64_t> words;
  build_tensor_table(refs.data(), static_cast<int64_t>(refs.size()), chunk, words);
  return words;
}

// Replays accesses on a cache of `capacity` entries holding at most `held_limit` for graphs: access
// i looks up key keys[i] (making it on a miss) with capture on when capturing[i] != 0, and gives 1
// (hit), 0 (made) or -1 (refused: the held tables at their limit); a key of -1 releases the held
// entries and gives how many. Then the final entries from the least to the most recently used as
// (key, held) pairs.
std::vector<int64_t> table_cache_trace_op(int64_t capacity, std::vector<int64_t> keys, std::vector<int64_t> capturing,
                                          int64_t held_limit) {
  TORCH_CHECK(capacity > 0 && held_limit >= 0 && keys.size() == capturing.size(),
              "fromage_fused: one capture flag per key");
  TableCache<int64_t> cache(static_cast<size_t>(capacity), static_cast<size_t>(held_limit));
  std::vector<int64_t> out;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (keys[i] == -1) {
      out.push_back(static_cast<int64_t>(cache.release_held([] {})));
      continue;
    }
    bool hit = false;
    try {
      cache.get({keys[i]}, capturing[i] != 0, [&] { return keys[i]; }, [](int64_t&) {}, &hit);
      out.push_back(hit ? 1 : 0);
    } catch (const GraphTablesFull&) {
      out.push_back(-1);
    }
  }
  const auto entries = cache.describe();
  out.insert(out.end(), entries.begin(), entries.end());
  return out;
}

// `threads` threads look up keys of their own in one cache of `capacity` entries, `iterations` each,
// every lookup a miss that evicts (and every 4th a hit): returns the lookups whose value was not
// their key (0 expected), then the final number of entries.
std::vector<int64_t> table_cache_threads_op(int64_t capacity, int64_t threads, int64_t iterations) {
  TORCH_CHECK(capacity > 0 && threads > 0 && iterations >= 0, "fromage_fused: positive sizes");
  TableCache<int64_t> cache(static_cast<size_t>(capacity), 0);
  std::atomic<int64_t> wrong{0};
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int64_t i = 0; i < iterations; ++i) {
        const int64_t key = t * iterations + (i % 4 == 3 ? i - 1 : i);
        const int64_t got = cache.get({key}, false, [&] { return key; }, [](int64_t&) {});
        if (got != key) wrong.fetch_add(1);
      }
    });
  }
  for (auto& th : pool) th.join();
  return {wrong.load(), static_cast<int64_t>(cache.size())};
}

// Replays requests on a staging pool that keeps `min_free` words free: request i of words[i] words
// is a take() when capturing[i] != 0 (gives its offset, or -1 if it does not fit) and a reserve()
// otherwise (gives -2). Then the sizes of the segments allocated, in order.
std::vector<int64_t> staging_pool_trace_op(int64_t min_free, std::vector<int64_t> words, std::vector<int64_t> capturing) {
  TORCH_CHECK(min_free >= 0 && words.size() == capturing.size(), "fromage_fused: one capture flag per request");
  std::vector<int64_t> allocated;
  StagingPool<int64_t> pool(min_free, [&](int64_t n) {
    allocated.push_back(n);
    return static_cast<int64_t>(allocated.size());
  });
  std::vector<int64_t> out;
  for (size_t i = 0; i < words.size(); ++i) {
    if (capturing[i] != 0) {
      int64_t segment = 0, offset = 0;
      out.push_back(pool.take(words[i], &segment, &offset) ? offset : -1);
    } else {
      pool.reserve(words[i]);
      out.push_back(-2);
    }
  }
  out.insert(out.end(), allocated.begin(), allocated.end());
  return out;
}

}  // namespace
}  // namespace ff

TORCH_LIBRARY_FRAGMENT(fromage_fused, m) {
  m.def("_cuda_tensor_table(int[] p, int[] g, int[] numels, int chunk) -> int[]", &ff::tensor_table_op);
  m.def("_table_cache_trace(int capacity, int[] keys, int[] capturing, int held_limit=1000000) -> int[]",
        &ff::table_cache_trace_op);
  m.def("_table_cache_threads(int capacity, int threads, int iterations) -> int[]", &ff::table_cache_threads_op);
  m.def("_staging_pool_trace(int min_free, int[] words, int[] capturing) -> int[]", &ff::staging_pool_trace_op);
}
