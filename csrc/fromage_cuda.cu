// Host side of the CUDA kernels: cuts the tensor list into launches (launch_plan.h) and fills
// each launch's by-value arguments. Only CUDA headers; the torch glue is fromage_cuda_ops.cpp.
#include <vector>

#include "fromage_kernels.cuh"
#include "launch_plan.h"

namespace ff {
namespace {

int64_t planned_chunks(int64_t numel) { return numel > 0 ? chunks_of(numel, kCudaChunk) : 1; }

// Calls launch(args, n_blocks) for each launch; returns the first CUDA error.
template <class Launch>
int for_each_launch(const TensorRef* t, int64_t n, Launch launch) {
  std::vector<int64_t> numels(n), base(n);
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    // An empty tensor gets one block of no elements: its stats row and max_norm are still written.
    numels[i] = t[i].numel > 0 ? t[i].numel : 1;
    base[i] = total;
    total += planned_chunks(t[i].numel);
  }
  for (const auto& l : plan_launches(numels, kCudaChunk, kMaxTensors, kMaxBlocks)) {
    Packed a;
    for (size_t s = 0; s < l.tensors.size(); ++s) {
      const TensorRef& r = t[l.tensors[s]];
      a.p[s] = r.p;
      a.g[s] = r.g;
      a.max_norm[s] = r.max_norm;
      a.numel[s] = r.numel;
      a.partial_base[s] = base[l.tensors[s]];
      a.index[s] = static_cast<int32_t>(l.tensors[s]);
      a.nchunks[s] = static_cast<int32_t>(planned_chunks(r.numel));
    }
    for (size_t b = 0; b < l.blocks.size(); ++b) {
      a.slot[b] = static_cast<uint8_t>(l.blocks[b].slot);
      a.chunk[b] = static_cast<int32_t>(l.blocks[b].chunk);
    }
    launch(a, static_cast<unsigned>(l.blocks.size()));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

template <class Tr>
int stats_for(const TensorRef* t, int64_t n, bool inner, float* stats, float* partials, unsigned* counters,
              cudaStream_t stream) {
  return for_each_launch(t, n, [&](const Packed& a, unsigned blocks) {
    stats_kernel<Tr><<<blocks, kThreads, 0, stream>>>(a, stats, partials, counters, inner ? 1 : 0);
  });
}

template <class Tr, bool SR>
int apply_for(const TensorRef* t, int64_t n, const float* stats, const float* lr, const float* found_inf,
              const float* grad_scale, const int64_t* seed, bool has_p_bound, float p_bound, bool maximize,
              bool prefactor, cudaStream_t stream) {
  return for_each_launch(t, n, [&](const Packed& a, unsigned blocks) {
    apply_kernel<Tr, SR><<<blocks, kThreads, 0, stream>>>(a, stats, lr, found_inf, grad_scale, seed,
                                                          has_p_bound ? 1 : 0, p_bound, maximize ? 1 : 0,
                                                          prefactor ? 1 : 0);
  });
}

}  // namespace

int64_t cuda_total_chunks(const TensorRef* t, int64_t n) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += planned_chunks(t[i].numel);
  return total;
}

int cuda_stats(const TensorRef* t, int64_t n, DType dtype, bool inner, float* stats, float* partials,
               unsigned* counters, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32: return stats_for<F32>(t, n, inner, stats, partials, counters, s);
    case DType::BF16: return stats_for<BF16>(t, n, inner, stats, partials, counters, s);
    default: return stats_for<F16>(t, n, inner, stats, partials, counters, s);
  }
}

int cuda_apply(const TensorRef* t, int64_t n, DType dtype, const float* stats, const float* lr,
               const float* found_inf, const float* grad_scale, const int64_t* seed, bool has_p_bound,
               float p_bound, bool maximize, bool prefactor, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32:
      return apply_for<F32, false>(t, n, stats, lr, found_inf, grad_scale, nullptr, has_p_bound, p_bound, maximize,
                                   prefactor, s);
    case DType::BF16:
      if (seed != nullptr)
        return apply_for<BF16, true>(t, n, stats, lr, found_inf, grad_scale, seed, has_p_bound, p_bound, maximize,
                                     prefactor, s);
      return apply_for<BF16, false>(t, n, stats, lr, found_inf, grad_scale, nullptr, has_p_bound, p_bound, maximize,
                                    prefactor, s);
    default:
      return apply_for<F16, false>(t, n, stats, lr, found_inf, grad_scale, nullptr, has_p_bound, p_bound, maximize,
                                   prefactor, s);
  }
}

int cuda_round_bf16_stochastic(const float* x, uint16_t* out, int64_t n, const int64_t* seed, int64_t tensor_index,
                               void* stream) {
  if (n == 0) return 0;
  const int64_t want = (n + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  round_bf16_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(x, out, n, seed, tensor_index);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace ff
