// Host side of the engine's CUDA kernel: one launch per pass over the tensor table (tensor_table.h),
// the rule and pass chosen here by name and index. Only CUDA headers; the torch glue (tables, cache,
// workspace) is engine_cuda_ops.cpp.
#include <cstring>

#include "engine_kernels.cuh"

namespace ff {
namespace {

int launched() { return static_cast<int>(cudaGetLastError()); }

template <class Rule, int P, class Tr, bool SR>
int launch(const int64_t* table, int64_t n, int64_t blocks, const StepArgs& args, float* sums, float* partials,
           unsigned* counters, const float* found_inf, cudaStream_t stream) {
  constexpr int S = Rule::template Pass<P>::kSums;
  // Only tensors of several blocks count their finished blocks; a group of one-block tensors
  // (blocks == n) needs no zeroed counters.
  if (S > 0 && blocks > n) {
    const cudaError_t err = cudaMemsetAsync(counters, 0, static_cast<size_t>(n) * sizeof(unsigned), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  pass_kernel<Rule, P, Tr, SR><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, n, args, sums, partials,
                                                                                     counters, found_inf);
  return launched();
}

// Stochastic rounding only where the pass writes the (bf16) parameters and the rule rounds in it.
template <class Rule, int P>
constexpr bool writes_params() {
  using Pass = typename Rule::template Pass<P>;
  if (!Rule::rounds(P)) return false;
  bool any = false;
  for (int k = 0; k < Pass::kWrites; ++k) any = any || Pass::param_list(k);
  return any;
}

template <class Rule, int P>
int launch_pass(DType dtype, bool sr, const int64_t* table, int64_t n, int64_t blocks, const StepArgs& args,
                float* sums, float* partials, unsigned* counters, const float* found_inf, cudaStream_t s) {
  switch (dtype) {
    case DType::F32: return launch<Rule, P, F32, false>(table, n, blocks, args, sums, partials, counters, found_inf, s);
    case DType::BF16:
      if constexpr (writes_params<Rule, P>()) {
        if (sr) return launch<Rule, P, BF16, true>(table, n, blocks, args, sums, partials, counters, found_inf, s);
      }
      return launch<Rule, P, BF16, false>(table, n, blocks, args, sums, partials, counters, found_inf, s);
    default: return launch<Rule, P, F16, false>(table, n, blocks, args, sums, partials, counters, found_inf, s);
  }
}

template <class Rule, int P = 0>
int run_rule(int64_t index, DType dtype, bool sr, const int64_t* table, int64_t n, int64_t blocks,
             const StepArgs& args, float* sums, float* partials, unsigned* counters, const float* found_inf,
             cudaStream_t s) {
  if constexpr (P < Rule::kPasses) {
    if (index == P) return launch_pass<Rule, P>(dtype, sr, table, n, blocks, args, sums, partials, counters, found_inf, s);
    return run_rule<Rule, P + 1>(index, dtype, sr, table, n, blocks, args, sums, partials, counters, found_inf, s);
  } else {
    return -1;
  }
}

}  // namespace

int cuda_pass(const char* rule, int64_t index, const int64_t* table, int64_t n, int64_t blocks, DType dtype,
              const StepArgs& args, float* sums, float* partials, unsigned* counters, const float* found_inf, bool sr,
              void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
#define FF_LAUNCH(rule_name, Functor)                                                                          \
  if (std::strcmp(rule, rule_name) == 0)                                                                       \
    return run_rule<Functor>(index, dtype, sr, table, n, blocks, args, sums, partials, counters, found_inf, s);
  FF_RULES(FF_LAUNCH)
#undef FF_LAUNCH
  return -1;
}

int cuda_round_bf16_stochastic(const float* x, uint16_t* out, int64_t n, const int64_t* seed, int64_t tensor_index,
                               void* stream) {
  if (n == 0) return 0;
  const int64_t want = (n + 255) / 256;
  const unsigned blocks = static_cast<unsigned>(want < 4096 ? want : 4096);
  round_bf16_kernel<<<blocks, 256, 0, static_cast<cudaStream_t>(stream)>>>(x, out, n, seed, tensor_index);
  return launched();
}

const char* cuda_error_string(int error) {
  return error < 0 ? "the kernels have no such rule or pass" : cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // namespace ff
