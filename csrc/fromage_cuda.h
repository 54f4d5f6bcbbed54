// Host interface of the CUDA kernels (fromage_cuda.cu). Plain C++: neither torch nor CUDA types,
// so the kernels compile with nvcc alone and the torch glue (fromage_cuda_ops.cpp) needs no CUDA
// headers of its own beyond torch's.
#pragma once

#include <cstdint>

namespace ff {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

struct TensorRef {
  void* p;           // parameter data (updated in place by apply)
  const void* g;     // gradient data
  int64_t numel;
};

constexpr int64_t kCudaChunk = 65536;  // elements per CUDA block

// Each returns 0 or a cudaError_t value. `stream` is a cudaStream_t. `table` is the device copy of
// the tensor table of tensor_table.h for n tensors in `blocks` blocks (one launch of that many
// CUDA blocks per phase).
// stats: [n, 3] float32 written for every tensor; partials: 3 * blocks floats; counters: n
// unsigned ints, zeroed here (on the stream) when a tensor has more than one block.
int cuda_stats(const int64_t* table, int64_t n, int64_t blocks, DType dtype, bool inner, float* stats,
               float* partials, unsigned* counters, void* stream);

// `max_norm`: the group's [n] float32 max_norm state with p_bound, else nullptr. All
// scalars but p_bound and the flags live in device memory; found_inf, grad_scale and seed may be
// nullptr.
int cuda_apply(const int64_t* table, float* max_norm, int64_t n, int64_t blocks, DType dtype,
               const float* stats, const float* lr, const float* found_inf, const float* grad_scale,
               const int64_t* seed, float p_bound, bool maximize, bool prefactor, void* stream);

// The kernels' element rounding on its own, for bit-exact tests of the recipe.
int cuda_round_bf16_stochastic(const float* x, uint16_t* out, int64_t n, const int64_t* seed, int64_t tensor_index,
                               void* stream);

const char* cuda_error_string(int error);

}  // namespace ff
