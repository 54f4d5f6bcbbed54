// torch glue of the CUDA kernels: validation, the tensor tables (built by tensor_table.h, uploaded
// from pinned buffers and cached, for every thread), workspace from torch's allocator, the current
// stream under a device guard, and the CUDA registrations of the ops defined in fromage_cpu.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "fromage_checks.h"
#include "fromage_cuda.h"
#include "tensor_table.h"

namespace ff {
namespace {

constexpr size_t kCachedTables = 64;       // tables of tensors (one per group)
constexpr size_t kGraphTableLimit = 256;   // of them held for captured CUDA graphs, at most
constexpr int64_t kStagingMinFree = 32768;  // int64 words of pinned memory kept for captured uploads

DType dtype_of(at::ScalarType t) {
  return t == at::kFloat ? DType::F32 : (t == at::kBFloat16 ? DType::BF16 : DType::F16);
}

std::vector<TensorRef> refs(at::TensorList params, at::TensorList grads) {
  std::vector<TensorRef> out(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    out[i].p = params[i].data_ptr();
    out[i].g = grads[i].data_ptr();
    out[i].numel = params[i].numel();
  }
  return out;
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "fromage_fused: CUDA ", what, " launch failed: ", cuda_error_string(err));
}

// An uploaded table. `host` is the pinned buffer the upload copied from: it lives as long as the
// entry, because a captured upload copies from it again at every replay.
struct Uploaded {
  at::Tensor host;
  at::Tensor device;
  int64_t blocks = 0;
  std::vector<c10::StreamId> streams;  // streams that have read `device` (for torch's allocator)
};

struct Table {
  at::Tensor device;  // held for the duration of the launch
  int64_t blocks;
};

// Never destroyed: freeing CUDA memory from a static destructor at exit can outlive the allocator.
TableCache<Uploaded>& cache() {
  static auto* tables = new TableCache<Uploaded>(kCachedTables, kGraphTableLimit);
  return *tables;
}
// Used under the cache's lock only (in its callbacks).
StagingPool<at::Tensor>& staging() {
  static auto* pool = new StagingPool<at::Tensor>(kStagingMinFree, [](int64_t words) {
    return at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  });
  return *pool;
}

// The cached device copy of the table for `key`; on a miss `build(words)` fills it and returns its
// block count, and it is uploaded on the current stream. Capture-safe: inside CUDA-graph capture
// the upload is captured from pinned memory the staging pool set aside outside capture, and the
// entry is held (the graph may replay at any time), up to kGraphTableLimit held entries.
template <class Build>
Table upload(const std::vector<int64_t>& key, const at::Device& device, Build build) {
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  auto make = [&] {
    std::vector<int64_t> words;
    Uploaded entry;
    entry.blocks = build(words);
    const int64_t size = static_cast<int64_t>(words.size());
    try {
      at::Tensor segment;
      int64_t offset = 0;
      if (capturing && staging().take(size, &segment, &offset)) {
        entry.host = segment.narrow(0, offset, size);
      } else {  // eager, or a capture the pool cannot serve (torch may still allocate there)
        entry.host = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
      }
      std::memcpy(entry.host.data_ptr<int64_t>(), words.data(), words.size() * sizeof(int64_t));
      entry.device = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
      entry.device.copy_(entry.host, /*non_blocking=*/true);
    } catch (const c10::Error& e) {
      if (!capturing) throw;
      TORCH_CHECK(false, "fromage_fused: the cuda backend needed a new tensor table inside CUDA graph capture (new "
                  "parameter or gradient storage) and could not upload it there: ", e.what_without_backtrace(),
                  ". Keep the gradients' storage of the warm-up steps instead: call zero_grad(set_to_none=False) "
                  "before capturing (or capture after a step on the same storage)");
    }
    if (!capturing) staging().reserve(size);
    entry.streams.push_back(stream.id());
    return entry;
  };
  auto touch = [&](Uploaded& hit) {
    if (capturing) return;
    staging().reserve(hit.host.numel());
    if (std::find(hit.streams.begin(), hit.streams.end(), stream.id()) == hit.streams.end()) {
      // Read on another stream than the one it was made on: when it is evicted, the allocator must
      // wait for this stream's work too before reusing the memory.
      c10::cuda::CUDACachingAllocator::recordStream(hit.device.storage().data_ptr(), stream);
      hit.streams.push_back(stream.id());
    }
  };
  try {
    const Uploaded entry = cache().get(key, capturing, make, touch);
    return Table{entry.device, entry.blocks};
  } catch (const GraphTablesFull&) {
    TORCH_CHECK(false, "fromage_fused: the cuda backend holds ", kGraphTableLimit, " tensor tables for captured CUDA "
                "graphs, its limit: a graph reads its tables at every replay, so each capture that sees new parameter "
                "or gradient storage holds new ones for good. Capture on the storage of the warm-up steps "
                "(zero_grad(set_to_none=False)), or, once the graphs that used them are freed and will not replay, "
                "call fromage_fused.release_graph_tables()");
  }
  return Table{};  // not reached
}

int64_t release_graph_tables_op() {
  return static_cast<int64_t>(cache().release_held([] { staging().clear(); }));
}

// Key: what the table holds (kind, device, addresses, sizes), so a hit is always a valid table.
Table tensor_table(const std::vector<TensorRef>& r, const at::Device& device) {
  std::vector<int64_t> key;
  key.reserve(3 * r.size() + 2);
  key.push_back(0);
  key.push_back(device.index());
  for (const auto& t : r) {
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.p)));
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.g)));
    key.push_back(t.numel);
  }
  Table table = upload(key, device, [&](std::vector<int64_t>& words) {
    return build_tensor_table(r.data(), static_cast<int64_t>(r.size()), kCudaChunk, words);
  });
  TORCH_CHECK(table.blocks <= std::numeric_limits<int32_t>::max(), "fromage_fused: a group of ", table.blocks,
              " blocks of ", kCudaChunk, " elements exceeds one launch; split the parameters into several groups");
  return table;
}

// The dispatcher sends a call here only when a CUDA tensor is in the lists, so they are not empty.
at::Tensor stats_cuda(at::TensorList params, at::TensorList grads, bool inner) {
  check_lists(params, grads, c10::DeviceType::CUDA);
  TORCH_INTERNAL_ASSERT(!params.empty());
  c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t n = static_cast<int64_t>(params.size());
  const auto r = refs(params, grads);
  const Table table = tensor_table(r, params[0].device());
  const auto opts = params[0].options().dtype(at::kFloat);
  auto stats = at::empty({n, 3}, opts);
  // Partials and counters serve tensors of several blocks only.
  auto partials = at::empty({table.blocks > n ? 3 * table.blocks : 0}, opts);
  auto counters = at::empty({table.blocks > n ? n : 0}, opts.dtype(at::kInt));
  check_launch(cuda_stats(table.device.const_data_ptr<int64_t>(), n, table.blocks, dtype_of(params[0].scalar_type()),
                          inner, stats.data_ptr<float>(), partials.data_ptr<float>(),
                          reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>()),
                          c10::cuda::getCurrentCUDAStream().stream()),
               "stats");
  return stats;
}

void apply_cuda(at::TensorList params, at::TensorList grads, const at::Tensor& stats, const at::Tensor& lr,
                const std::optional<at::Tensor>& max_norm, std::optional<double> p_bound, bool maximize,
                bool prefactor, const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& sr_seed) {
  check_apply(params, grads, stats, lr, max_norm, p_bound, found_inf, grad_scale, sr_seed, c10::DeviceType::CUDA);
  TORCH_INTERNAL_ASSERT(!params.empty());
  c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t n = static_cast<int64_t>(params.size());
  const auto r = refs(params, grads);
  const Table table = tensor_table(r, params[0].device());
  const bool sr = sr_seed.has_value() && params[0].scalar_type() == at::kBFloat16;
  check_launch(cuda_apply(table.device.const_data_ptr<int64_t>(),
                          p_bound.has_value() ? max_norm->data_ptr<float>() : nullptr, n, table.blocks,
                          dtype_of(params[0].scalar_type()), stats.const_data_ptr<float>(), lr.const_data_ptr<float>(),
                          found_inf ? found_inf->const_data_ptr<float>() : nullptr,
                          grad_scale ? grad_scale->const_data_ptr<float>() : nullptr,
                          sr ? sr_seed->const_data_ptr<int64_t>() : nullptr, static_cast<float>(p_bound.value_or(0.0)),
                          maximize, prefactor, c10::cuda::getCurrentCUDAStream().stream()),
               "apply");
}

at::Tensor round_bf16_stochastic_cuda(const at::Tensor& x, const at::Tensor& seed, int64_t tensor_index) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fromage_fused: round_bf16_stochastic takes float32");
  check_scalar("seed", seed, at::kLong, x.device());
  c10::cuda::CUDAGuard guard(x.device());
  const auto src = x.contiguous();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  check_launch(cuda_round_bf16_stochastic(src.const_data_ptr<float>(), reinterpret_cast<uint16_t*>(out.data_ptr()),
                                          src.numel(), seed.const_data_ptr<int64_t>(), tensor_index,
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "round_bf16_stochastic");
  return out;
}

}  // namespace
}  // namespace ff

TORCH_LIBRARY_FRAGMENT(fromage_fused, m) {
  // Present only where the CUDA ops are built: fromage_fused.release_graph_tables() calls it.
  m.def("_release_graph_tables() -> int", &ff::release_graph_tables_op);
}

TORCH_LIBRARY_IMPL(fromage_fused, CUDA, m) {
  m.impl("stats", &ff::stats_cuda);
  m.impl("apply_", &ff::apply_cuda);
  m.impl("round_bf16_stochastic", &ff::round_bf16_stochastic_cuda);
}
