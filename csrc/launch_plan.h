// How the multi-tensor CUDA kernels cut a list of tensors into launches. Pure host C++ (no torch,
// no CUDA), so that the CPU build exposes it and the tests check it without a GPU.
//
// Every tensor is cut into chunks of `chunk` elements; a block handles one (tensor, chunk). A
// launch carries at most `max_tensors` tensor slots and `max_blocks` blocks in its arguments; when
// either fills, the launch is closed and the next one starts, resuming a tensor mid-way if needed
// (that tensor then occupies a slot in both launches).
#pragma once

#include <cstdint>
#include <vector>

namespace ff {

struct PlannedBlock {
  int32_t slot;    // index into the launch's tensor slots
  int64_t chunk;   // chunk of that tensor
};

struct PlannedLaunch {
  std::vector<int64_t> tensors;  // global tensor index of each slot
  std::vector<PlannedBlock> blocks;
};

inline int64_t chunks_of(int64_t numel, int64_t chunk) { return (numel + chunk - 1) / chunk; }

inline std::vector<PlannedLaunch> plan_launches(const std::vector<int64_t>& numels, int64_t chunk,
                                                int64_t max_tensors, int64_t max_blocks) {
  std::vector<PlannedLaunch> launches;
  PlannedLaunch cur;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    const int64_t n_chunks = chunks_of(numels[t], chunk);
    for (int64_t c = 0; c < n_chunks; ++c) {
      const bool new_slot = cur.tensors.empty() || cur.tensors.back() != t;
      if ((new_slot && static_cast<int64_t>(cur.tensors.size()) == max_tensors) ||
          static_cast<int64_t>(cur.blocks.size()) == max_blocks) {
        launches.push_back(std::move(cur));
        cur = PlannedLaunch();
      }
      if (cur.tensors.empty() || cur.tensors.back() != t) cur.tensors.push_back(t);
      cur.blocks.push_back({static_cast<int32_t>(cur.tensors.size() - 1), c});
    }
  }
  if (!cur.blocks.empty()) launches.push_back(std::move(cur));
  return launches;
}

}  // namespace ff
