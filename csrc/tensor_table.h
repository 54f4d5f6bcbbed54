// The tensor table of the multi-tensor CUDA kernels, and the cache that keeps uploaded tables.
// Pure host C++ (no torch, no CUDA runtime) shared by the CUDA path (engine_cuda_ops.cpp builds
// and uploads tables, the kernels read them) and a CPU-built test hook (fromage_table_hook.cpp),
// so that the packing and the cache are tested without a GPU.
//
// A group of n tensors is cut into blocks of `chunk` elements; one CUDA block handles one block of
// one tensor, and every tensor owns at least one block (an empty tensor's block still writes its
// sums row and its per-tensor state). The table is one int64 array in device memory, so that a
// launch carries a pointer instead of the tensors themselves: one launch per pass for any tensor
// count. For a pass of L tensor lists (Fromage's: p, g):
//
//   word   [0, n) ... [(L-1)n, Ln)   [Ln, (L+1)n)  [(L+1)n, (L+2)n)  [(L+2)n, (L+3)n)  [(L+3)n, ...+ceil(C/2))
//          list 0 ... list L-1 addr  numel         first block       blocks            block -> tensor (int32, C)
#pragma once

#include <cstdint>
#include <cstring>
#include <list>
#include <unordered_map>
#include <utility>
#include <vector>

#include "engine_cuda.h"

#if defined(__CUDACC__)
#define FF_TABLE_HD __host__ __device__ __forceinline__
#else
#define FF_TABLE_HD inline
#endif

namespace ff {

FF_TABLE_HD int64_t col_numel(int64_t lists) { return lists; }
FF_TABLE_HD int64_t col_first(int64_t lists) { return lists + 1; }
FF_TABLE_HD int64_t col_blocks(int64_t lists) { return lists + 2; }
FF_TABLE_HD int64_t table_columns(int64_t lists) { return lists + 3; }

FF_TABLE_HD int64_t blocks_of(int64_t numel, int64_t chunk) { return numel > 0 ? (numel + chunk - 1) / chunk : 1; }

FF_TABLE_HD int64_t table_words(int64_t n, int64_t lists, int64_t blocks) {
  return table_columns(lists) * n + (blocks + 1) / 2;
}

// Fills `words` with the table of tensors t[0..n) of `lists` lists; returns the number of blocks C.
inline int64_t build_tensor_table(const TensorRef* t, int64_t n, int64_t lists, int64_t chunk,
                                  std::vector<int64_t>& words) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < n; ++i) blocks += blocks_of(t[i].numel, chunk);
  words.assign(static_cast<size_t>(table_words(n, lists, blocks)), 0);
  int64_t* w = words.data();
  std::vector<int32_t> owner(static_cast<size_t>(blocks));
  int64_t first = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = blocks_of(t[i].numel, chunk);
    for (int64_t k = 0; k < lists; ++k) w[k * n + i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t[i].ptr[k]));
    w[col_numel(lists) * n + i] = t[i].numel;
    w[col_first(lists) * n + i] = first;
    w[col_blocks(lists) * n + i] = count;
    for (int64_t b = 0; b < count; ++b) owner[static_cast<size_t>(first + b)] = static_cast<int32_t>(i);
    first += count;
  }
  if (blocks > 0) std::memcpy(w + table_columns(lists) * n, owner.data(), owner.size() * sizeof(int32_t));
  return blocks;
}

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& key) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
    for (int64_t v : key) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

// Least-recently-used cache of uploaded tables, keyed by what the table holds (addresses, sizes),
// so an entry is valid for as long as it exists. An entry used while a CUDA graph is being captured
// is held for good: the graph's kernels read its device memory, and a captured upload re-reads its
// pinned host buffer, at every replay. Only entries no graph holds are evicted; when every entry is
// held the cache grows instead.
template <class Value>
class TableCache {
 public:
  explicit TableCache(size_t capacity) : capacity_(capacity) {}

  // The entry for `key` (now the most recently used), or nullptr.
  Value* find(const std::vector<int64_t>& key, bool capturing) {
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.end(), order_, it->second);
    it->second->held = it->second->held || capturing;
    return &it->second->value;
  }

  // Adds `value` under `key` unless the key is there already (a held entry must never be replaced);
  // returns the entry.
  Value& insert(std::vector<int64_t> key, Value value, bool capturing) {
    if (Value* existing = find(key, capturing)) return *existing;
    order_.push_back(Node{key, std::move(value), capturing});
    auto node = std::prev(order_.end());
    index_[std::move(key)] = node;
    for (auto it = order_.begin(); order_.size() > capacity_ && it != node;) {
      if (it->held) {
        ++it;
        continue;
      }
      index_.erase(it->key);
      it = order_.erase(it);
    }
    return node->value;
  }

  size_t size() const { return order_.size(); }

  // Keys from the least to the most recently used, each followed by 1 if a graph holds it, else 0.
  std::vector<int64_t> describe() const {
    std::vector<int64_t> out;
    for (const auto& node : order_) {
      out.insert(out.end(), node.key.begin(), node.key.end());
      out.push_back(node.held ? 1 : 0);
    }
    return out;
  }

 private:
  struct Node {
    std::vector<int64_t> key;
    Value value;
    bool held;
  };
  size_t capacity_;
  std::list<Node> order_;
  std::unordered_map<std::vector<int64_t>, typename std::list<Node>::iterator, KeyHash> index_;
};

}  // namespace ff
