// What the engine hands a rule's kernel code, on the CPU and on CUDA alike (plain C++: no torch,
// no CUDA headers). A rule (rule_<name>.h) is a struct with kName (its Python name), kPasses,
// kHyper (how many packed hyper-parameters it reads), kScalarNames and scalars(flags) (its
// per-tensor scalar states and how many a step with these flags carries), and, per pass P, a
// nested Pass<P> that says
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
};

// A fixed number of values of type V (N may be 0).
template <class V, int N>
struct Vals {
  V v[N > 0 ? N : 1];
  FF_HD V& operator[](int i) { return v[i]; }
  FF_HD const V& operator[](int i) const { return v[i]; }
};

}  // namespace ff
