// Host interface of the engine's CUDA kernels (engine_cuda.cu). Plain C++: neither torch nor CUDA
// types, so the kernels compile with nvcc alone and the torch glue (engine_cuda_ops.cpp) needs no
// CUDA headers of its own beyond torch's.
#pragma once

#include <cstdint>

#include "engine.h"

namespace ff {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

constexpr int kMaxLists = 4;  // tensor lists of a pass

// One tensor of a group: its data in each of the pass's lists (the written ones updated in place).
struct TensorRef {
  const void* ptr[kMaxLists];
  int64_t numel;
};

constexpr int64_t kCudaChunk = 65536;  // elements per CUDA block

// Runs pass `index` of rule `rule` (its Python name) over a group. Returns 0 or a cudaError_t
// value; -1 for an unknown rule or pass. `table` is the device copy of the tensor table of
// tensor_table.h for n tensors of `lists` lists in `blocks` blocks (one launch of that many CUDA
// blocks). `args` holds device pointers. sums: [n, k] float32 written for every tensor (k the pass's
// sums); partials: k * blocks floats; counters: n unsigned ints, zeroed here (on the stream) when a
// tensor has more than one block. `found_inf` may be null; `sr`: bf16 results rounded stochastically
// with args.seed. `stream` is a cudaStream_t.
int cuda_pass(const char* rule, int64_t index, const int64_t* table, int64_t n, int64_t blocks, DType dtype,
              const StepArgs& args, float* sums, float* partials, unsigned* counters, const float* found_inf, bool sr,
              void* stream);

// The kernels' element rounding on its own, for bit-exact tests of the recipe.
int cuda_round_bf16_stochastic(const float* x, uint16_t* out, int64_t n, const int64_t* seed, int64_t tensor_index,
                               void* stream);

const char* cuda_error_string(int error);

}  // namespace ff
