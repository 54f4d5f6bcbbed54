// Host side of the CUDA kernels: one launch per phase over the tensor table (tensor_table.h).
// Only CUDA headers; the torch glue (tables, cache, workspace) is fromage_cuda_ops.cpp.
#include "fromage_kernels.cuh"

namespace ff {
namespace {

int launched() { return static_cast<int>(cudaGetLastError()); }

template <class Tr>
int stats_for(const int64_t* table, int64_t n, int64_t blocks, bool inner, float* stats, float* partials,
              unsigned* counters, cudaStream_t stream) {
  // Only tensors of several blocks count their finished blocks; a group of one-block tensors
  // (blocks == n) needs no zeroed counters.
  if (blocks > n) {
    const cudaError_t err = cudaMemsetAsync(counters, 0, static_cast<size_t>(n) * sizeof(unsigned), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  stats_kernel<Tr><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, n, stats, partials, counters,
                                                                           inner ? 1 : 0);
  return launched();
}

template <class Tr, bool SR>
int apply_for(const int64_t* table, float* max_norm, int64_t n, int64_t blocks, const float* stats,
              const float* lr, const float* found_inf, const float* grad_scale, const int64_t* seed, float p_bound,
              bool maximize, bool prefactor, cudaStream_t stream) {
  apply_kernel<Tr, SR><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      table, max_norm, n, stats, lr, found_inf, grad_scale, seed, p_bound, maximize ? 1 : 0, prefactor ? 1 : 0);
  return launched();
}

}  // namespace

int cuda_stats(const int64_t* table, int64_t n, int64_t blocks, DType dtype, bool inner, float* stats,
               float* partials, unsigned* counters, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32: return stats_for<F32>(table, n, blocks, inner, stats, partials, counters, s);
    case DType::BF16: return stats_for<BF16>(table, n, blocks, inner, stats, partials, counters, s);
    default: return stats_for<F16>(table, n, blocks, inner, stats, partials, counters, s);
  }
}

int cuda_apply(const int64_t* table, float* max_norm, int64_t n, int64_t blocks, DType dtype,
               const float* stats, const float* lr, const float* found_inf, const float* grad_scale,
               const int64_t* seed, float p_bound, bool maximize, bool prefactor, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::F32:
      return apply_for<F32, false>(table, max_norm, n, blocks, stats, lr, found_inf, grad_scale, nullptr, p_bound,
                                   maximize, prefactor, s);
    case DType::BF16:
      if (seed != nullptr)
        return apply_for<BF16, true>(table, max_norm, n, blocks, stats, lr, found_inf, grad_scale, seed, p_bound,
                                     maximize, prefactor, s);
      return apply_for<BF16, false>(table, max_norm, n, blocks, stats, lr, found_inf, grad_scale, nullptr, p_bound,
                                    maximize, prefactor, s);
    default:
      return apply_for<F16, false>(table, max_norm, n, blocks, stats, lr, found_inf, grad_scale, nullptr, p_bound,
                                   maximize, prefactor, s);
  }
}

int cuda_round_bf16_stochastic(const float* x, uint16_t* out, int64_t n, const int64_t* seed, int64_t tensor_index,
                               void* stream) {
  if (n == 0) return 0;
  const int64_t want = (n + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  round_bf16_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(x, out, n, seed, tensor_index);
  return launched();
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace ff
