// The tensor table of the multi-tensor CUDA kernels, and the cache that keeps uploaded tables.
// Pure host C++ (no torch, no CUDA runtime) shared by the CUDA path (fromage_cuda_ops.cpp builds
// and uploads tables, the kernels read them) and a CPU-built test hook (fromage_table_hook.cpp),
// so that the packing and the cache are tested without a GPU.
//
// A group of n tensors is cut into blocks of `chunk` elements; one CUDA block handles one block of
// one tensor, and every tensor owns at least one block (an empty tensor's block still writes its
// stats row and its max_norm). The table is one int64 array in device memory, so that a launch
// carries a pointer instead of the tensors themselves: one launch per phase for any tensor count.
//
//   word   [0, n)   [n, 2n)   [2n, 3n)  [3n, 4n)      [4n, 5n)    [5n, 5n + ceil(C / 2))
//          p addr   g addr    numel     first block   blocks      block -> tensor (int32, C)
#pragma once

#include <cstdint>
#include <cstring>
#include <list>
#include <unordered_map>
#include <utility>
#include <vector>

#include "fromage_cuda.h"

#if defined(__CUDACC__)
#define FF_TABLE_HD __host__ __device__ __forceinline__
#else
#define FF_TABLE_HD inline
#endif

namespace ff {

enum TableColumn : int64_t { kColP = 0, kColG = 1, kColNumel = 2, kColFirst = 3, kColBlocks = 4, kColumns = 5 };

FF_TABLE_HD int64_t blocks_of(int64_t numel, int64_t chunk) { return numel > 0 ? (numel + chunk - 1) / chunk : 1; }

FF_TABLE_HD int64_t table_words(int64_t n, int64_t blocks) { return kColumns * n + (blocks + 1) / 2; }

// Fills `words` with the table of tensors t[0..n); returns the number of blocks C.
inline int64_t build_tensor_table(const TensorRef* t, int64_t n, int64_t chunk, std::vector<int64_t>& words) {
  int64_t blocks = 0;
  for (int64_t i = 0; i < n; ++i) blocks += blocks_of(t[i].numel, chunk);
  words.assign(static_cast<size_t>(table_words(n, blocks)), 0);
  int64_t* w = words.data();
  std::vector<int32_t> owner(static_cast<size_t>(blocks));
  int64_t first = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = blocks_of(t[i].numel, chunk);
    w[kColP * n + i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t[i].p));
    w[kColG * n + i] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t[i].g));
    w[kColNumel * n + i] = t[i].numel;
    w[kColFirst * n + i] = first;
    w[kColBlocks * n + i] = count;
    for (int64_t b = 0; b < count; ++b) owner[static_cast<size_t>(first + b)] = static_cast<int32_t>(i);
    first += count;
  }
  if (blocks > 0) std::memcpy(w + kColumns * n, owner.data(), owner.size() * sizeof(int32_t));
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
