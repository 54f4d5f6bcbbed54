// The tensor table of the multi-tensor CUDA kernels, the cache that keeps uploaded tables and the
// pinned staging pool of uploads made inside CUDA-graph capture.
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
#include <functional>
#include <list>
#include <mutex>
#include <stdexcept>
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

// Thrown by TableCache::get when a capture needs one more held table than the limit allows.
struct GraphTablesFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Least-recently-used cache of uploaded tables, keyed by what the table holds (addresses, sizes),
// so an entry is valid for as long as it exists. An entry used while a CUDA graph is being captured
// is held: the graph's kernels read its device memory, and a captured upload re-reads its host
// buffer, at every replay. Only entries no graph holds are evicted; at most `held_limit` are held
// (a capture that needs one more is refused), until release_held(). Every access takes the
// cache's lock, and callers get a copy of the value, never a pointer into the cache: one cache
// serves every thread.
template <class Value>
class TableCache {
 public:
  TableCache(size_t capacity, size_t held_limit) : capacity_(capacity), held_limit_(held_limit) {}

  // The value for `key`: on a hit `touch(value)` runs on the entry (now the most recently used), on
  // a miss `make()` makes it, and it is inserted. Both run under the lock; if either throws, nothing
  // changes. Throws GraphTablesFull, before calling either, when `capturing` would hold one more
  // table than the limit allows. `*hit` (if given) says which.
  template <class Make, class Touch>
  Value get(const std::vector<int64_t>& key, bool capturing, Make&& make, Touch&& touch, bool* hit = nullptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = index_.find(key);
    const bool found = it != index_.end();
    if (hit != nullptr) *hit = found;
    if (capturing && !(found && it->second->held) && held_ >= held_limit_)
      throw GraphTablesFull("held tables at their limit");
    if (found) {
      touch(it->second->value);
      order_.splice(order_.end(), order_, it->second);
      hold(*it->second, capturing);
      return it->second->value;
    }
    Value value = make();
    order_.push_back(Node{key, std::move(value), false});
    auto node = std::prev(order_.end());
    index_[key] = node;
    hold(*node, capturing);
    for (auto e = order_.begin(); order_.size() > capacity_ && e != node;) {
      if (e->held) {
        ++e;
        continue;
      }
      index_.erase(e->key);
      e = order_.erase(e);
    }
    return node->value;
  }

  // Held entries become ordinary ones again (the least recently used past the capacity go);
  // `then()` runs under the lock. Returns how many were held.
  template <class Then>
  size_t release_held(Then&& then) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t released = held_;
    for (auto& node : order_) node.held = false;
    held_ = 0;
    while (order_.size() > capacity_) {
      index_.erase(order_.front().key);
      order_.pop_front();
    }
    then();
    return released;
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return order_.size();
  }

  // Keys from the least to the most recently used, each followed by 1 if a graph holds it, else 0.
  std::vector<int64_t> describe() {
    std::lock_guard<std::mutex> lock(mutex_);
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
  void hold(Node& node, bool capturing) {
    if (capturing && !node.held) {
      node.held = true;
      ++held_;
    }
  }
  size_t capacity_, held_limit_, held_ = 0;
  std::mutex mutex_;
  std::list<Node> order_;
  std::unordered_map<std::vector<int64_t>, typename std::list<Node>::iterator, KeyHash> index_;
};

// Host memory for the uploads made while a CUDA graph is captured, set aside outside capture:
// allocating pinned memory inside a capture fails on older torch, and the graph copies from the
// buffer again at every replay, so it must stay. reserve() (outside capture) keeps enough free,
// allocating a new segment if need be; take() (inside) hands out words of the current segment and
// never allocates. Words are never handed out twice; a segment lives as long as a table holds
// some of it (Segment is a reference-counted buffer). Not locked: used under the table cache's lock.
template <class Segment>
class StagingPool {
 public:
  using Allocate = std::function<Segment(int64_t words)>;
  StagingPool(int64_t min_free, Allocate allocate) : min_free_(min_free), allocate_(std::move(allocate)) {}

  int64_t free_words() const { return size_ - used_; }

  // After a table of `words` was needed: at least max(min_free, 2 * the largest table) words free.
  void reserve(int64_t words) {
    largest_ = words > largest_ ? words : largest_;
    const int64_t want = min_free_ > 2 * largest_ ? min_free_ : 2 * largest_;
    if (free_words() < want) {
      segment_ = allocate_(2 * want);
      size_ = 2 * want;
      used_ = 0;
    }
  }

  // `words` of the current segment, at `*offset`; false (and nothing taken) if they do not fit.
  bool take(int64_t words, Segment* segment, int64_t* offset) {
    if (free_words() < words) return false;
    *segment = segment_;
    *offset = used_;
    used_ += words;
    return true;
  }

  // A fresh segment at the next reserve(); what was handed out stays with its tables.
  void clear() {
    segment_ = Segment();
    size_ = used_ = 0;
  }

 private:
  int64_t min_free_, largest_ = 0, size_ = 0, used_ = 0;
  Allocate allocate_;
  Segment segment_{};
};

}  // namespace ff
