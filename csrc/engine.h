// What the engine hands a rule's kernel code, on the CPU and on CUDA alike (plain C++: no torch,
// no CUDA headers). A rule (rule_<name>.h) is a struct with kName (its Python name), kPasses,
// kHyper (how many packed hyper-parameters it reads), kLrSlot (the slot of its lr, or -1),
// rounds(P) (whether kernel pass P may round bf16 results stochastically),
// kScalarNames and scalars(flags) (its per-tensor scalar states and how many a step with these
// flags carries), kernel_pass(index, flags) (the kernel pass that runs the rule's Python pass
// `index`: one kernel pass per set of lists present), and, per kernel pass P, a nested Pass<P>
// that says
//
//   kLists, kWrites, kSums    the tensor lists the pass reads (the first kWrites are written in
//                             place) and the per-tensor sums it reduces;
//   kSumsIn, kGlobals         how many columns of the previous pass's sums, and how many global
//                             values, its coefficients read (0: none is passed);
//   param_list(k)             whether list k holds the parameters' dtype (else it is a buffer:
//                             float32 for bf16/fp16 parameters);
//   Coef coefficients(args, t)  the per-tensor coefficients of tensor t, from the previous pass's
//                             sums, the packed hyper-parameters, the flags and the per-tensor and
//                             global state (one __host__ __device__ function: the CPU kernels call
//                             it on the host, the CUDA kernels in every block of the tensor);
//   void store(args, t, coef) what the pass writes into per-tensor scalars (once per tensor);
//                             coefficients read them with read_scalar, store writes them with
//                             write_scalar (below: no data race on the GPU);
//   kStageHalf (optional)     true: the CUDA kernels stage half as many loads for it (a body that
//                             needs more registers than the full staging leaves);
//   template <class V> body(coef, Vals<V, kLists>& x, Vals<V, kSums>& acc)
//                             the elementwise body, over float (scalar code and CUDA threads) or
//                             at::vec::Vectorized<float> (the CPU's vector loops): it updates the
//                             written x in place and adds its terms to acc with fma_acc.
#pragma once

#include <cstdint>

#include "numerics.h"

namespace ff {

constexpr int kMaxScalars = 4;  // per-tensor scalar states of a rule

// The same for every tensor of one pass over one group (by value into a CUDA launch).
struct StepArgs {
  const float* hyper = nullptr;       // the packed hyper-parameters (Spec.pack), float32
  int64_t flags = 0;                  // the rule's flag bits
  const float* sums = nullptr;        // the previous pass's [n, k] sums, or null
  const float* globals = nullptr;     // a combining pass's global values, or null
  const float* grad_scale = nullptr;  // GradScaler's scale, or null
  const int64_t* seed = nullptr;      // the stochastic-rounding seed (bf16 groups), or null
  float* scalars[kMaxScalars] = {};   // per-tensor scalar states, each [n], or null
  int64_t n = 0;
  // On the GPU: this block's tensor's per-tensor scalars as the block found them (shared memory).
  const float* block_scalars = nullptr;
};

// Per-tensor scalar k of tensor t, as the pass found it. On the GPU every block of a tensor reads it
// while the tensor's first block may write it: one thread per block reads it with an atomic (adding 0
// to its bits changes nothing) and hands it to the others through shared memory (the kernel fills
// block_scalars), and write_scalar is an atomic exchange: no data race. The other blocks read the
// old value or the new one, and a rule must compute the same coefficients from either. (Built-in
// atomics: <cuda/atomic> doubles the kernels' compile time.)
FF_HD float read_scalar(const StepArgs& a, int k, int64_t t) {
#if defined(__CUDA_ARCH__)
  (void)t;
  return a.block_scalars[k];
#else
  return a.scalars[k][t];
#endif
}
FF_HD void write_scalar(const StepArgs& a, int k, int64_t t, float v) {
#if defined(__CUDA_ARCH__)
  atomicExch(a.scalars[k] + t, v);
#else
  a.scalars[k][t] = v;
#endif
}

// Whether a pass that writes may run: a rule whose packed hyper-parameters hold an lr (Rule::kLrSlot
// >= 0) skips, as with found_inf, when it is not usable (a tensor lr edited after construction).
template <class Rule>
FF_HD bool lr_usable(const float* hyper) {
  return Rule::kLrSlot < 0 || usable_lr(hyper[Rule::kLrSlot]);
}

// A fixed number of values of type V (N may be 0).
template <class V, int N>
struct Vals {
  V v[N > 0 ? N : 1];
  FF_HD V& operator[](int i) { return v[i]; }
  FF_HD const V& operator[](int i) const { return v[i]; }
};

}  // namespace ff
