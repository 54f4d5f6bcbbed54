// torch glue of the engine's CUDA kernel: validation (engine_checks.h), the tensor tables (built by
// tensor_table.h, uploaded from pinned buffers and cached, for every thread), workspace from torch's
// allocator, the current stream under a device guard, and the CUDA implementations of the engine's
// op (its schema is defined in fromage_fused/engine/ops.py) and of the rounding test op.
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

#include <string>
#include <string_view>

#include "engine_checks.h"
#include "engine_cuda.h"
#include "rules.h"
#include "tensor_table.h"

namespace ff {
namespace {

constexpr size_t kCachedTables = 64;       // tables of tensors (one per group)
constexpr size_t kGraphTableLimit = 256;   // of them held for captured CUDA graphs, at most
constexpr int64_t kStagingMinFree = 32768;  // int64 words of pinned memory kept for captured uploads

DType dtype_of(at::ScalarType t) {
  return t == at::kFloat ? DType::F32 : (t == at::kBFloat16 ? DType::BF16 : DType::F16);
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

// Key: what the table holds (list count, device, addresses, sizes), so a hit is always a valid table.
Table tensor_table(const std::vector<TensorRef>& r, int64_t lists, const at::Device& device) {
  std::vector<int64_t> key;
  key.reserve(static_cast<size_t>(lists + 1) * r.size() + 2);
  key.push_back(lists);
  key.push_back(device.index());
  for (const auto& t : r) {
    for (int64_t k = 0; k < lists; ++k) key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.ptr[k])));
    key.push_back(t.numel);
  }
  Table table = upload(key, device, [&](std::vector<int64_t>& words) {
    return build_tensor_table(r.data(), static_cast<int64_t>(r.size()), lists, kCudaChunk, words);
  });
  TORCH_CHECK(table.blocks <= std::numeric_limits<int32_t>::max(), "fromage_fused: a group of ", table.blocks,
              " blocks of ", kCudaChunk, " elements exceeds one launch; split the parameters into several groups");
  return table;
}

template <class Rule, int P>
at::Tensor dispatch_pass(at::TensorList writes, at::TensorList reads, const std::optional<at::Tensor>& sums,
                         const at::Tensor& hyper, int64_t flags, at::TensorList scalars,
                         const std::optional<at::Tensor>& globals, const std::optional<at::Tensor>& found_inf,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& seed) {
  using Pass = typename Rule::template Pass<P>;
  constexpr int L = Pass::kLists, W = Pass::kWrites, S = Pass::kSums;
  const PassShape shape = check_pass<Rule, P>(writes, reads, sums, hyper, flags, scalars, globals, found_inf,
                                              grad_scale, seed, c10::DeviceType::CUDA);
  const int64_t n = shape.n;
  if (n == 0) return at::zeros({0, S}, hyper.options());  // no launch, no table
  c10::cuda::CUDAGuard guard(shape.device);
  std::vector<TensorRef> refs(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    for (int k = 0; k < L; ++k) {
      const at::Tensor& x = k < W ? writes[static_cast<size_t>(k * n + t)] : reads[static_cast<size_t>((k - W) * n + t)];
      refs[static_cast<size_t>(t)].ptr[k] = x.data_ptr();
    }
    refs[static_cast<size_t>(t)].numel = (W > 0 ? writes[static_cast<size_t>(t)] : reads[static_cast<size_t>(t)]).numel();
  }
  const Table table = tensor_table(refs, L, shape.device);
  const auto opts = hyper.options().dtype(at::kFloat);
  auto out = at::empty({n, S}, opts);
  // Partials and counters serve tensors of several blocks only.
  const bool several = S > 0 && table.blocks > n;
  auto partials = at::empty({several ? S * table.blocks : 0}, opts);
  auto counters = at::empty({several ? n : 0}, opts.dtype(at::kInt));
  const StepArgs args = step_args<Rule, P>(sums, hyper, flags, scalars, globals, grad_scale, seed, shape);
  const DType dtype = dtype_of(shape.dtype);
  check_launch(cuda_pass(Rule::kName, P, table.device.const_data_ptr<int64_t>(), n, table.blocks, dtype, args,
                         out.data_ptr<float>(), partials.data_ptr<float>(),
                         reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>()),
                         found_inf ? found_inf->const_data_ptr<float>() : nullptr, args.seed != nullptr,
                         c10::cuda::getCurrentCUDAStream().stream()),
               "pass");
  return out;
}

template <class Rule, int P = 0>
at::Tensor pass_of(int64_t index, at::TensorList writes, at::TensorList reads, const std::optional<at::Tensor>& sums,
                   const at::Tensor& hyper, int64_t flags, at::TensorList scalars,
                   const std::optional<at::Tensor>& globals, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& seed) {
  if constexpr (P < Rule::kPasses) {
    if (index == P)
      return dispatch_pass<Rule, P>(writes, reads, sums, hyper, flags, scalars, globals, found_inf, grad_scale, seed);
    return pass_of<Rule, P + 1>(index, writes, reads, sums, hyper, flags, scalars, globals, found_inf, grad_scale, seed);
  } else {
    TORCH_CHECK(false, "fromage_fused: rule ", Rule::kName, " has ", Rule::kPasses, " passes, got pass ", index);
  }
}

at::Tensor pass_cuda(c10::string_view rule, int64_t index, at::TensorList writes, at::TensorList reads,
                     const std::optional<at::Tensor>& sums, const at::Tensor& hyper, int64_t flags,
                     at::TensorList scalars, const std::optional<at::Tensor>& globals,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& seed, int64_t /*backend*/) {
  const std::string_view name(rule.data(), rule.size());
#define FF_DISPATCH(rule_name, Functor)                                                                            \
  if (name == rule_name)                                                                                           \
    return pass_of<Functor>(Functor::kernel_pass(index, flags), writes, reads, sums, hyper, flags, scalars, globals, \
                            found_inf, grad_scale, seed);
  FF_RULES(FF_DISPATCH)
#undef FF_DISPATCH
  TORCH_CHECK(false, "fromage_fused: the CUDA kernels have no rule ", name);
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
  m.impl("pass_", &ff::pass_cuda);
  m.impl("round_bf16_stochastic", &ff::round_bf16_stochastic_cuda);
}
