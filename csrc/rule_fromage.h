// The Fromage rule in C++: its hyper-parameter slots and flag bits (in the order of
// fromage_fused/rules/fromage: the spec and flags.py), its per-tensor coefficients (one
// __host__ __device__ function: the CPU kernels call it on the host, the CUDA kernels on the
// device) and its two elementwise bodies. See engine.h for what a rule provides.
//
//   pass 0  lists p, g; sums ||p||^2, ||g||^2, <p, g> (the last only with kInner)
//   pass 1  lists p (written), g; p <- round(round(cp * p) + round(cg * g)); sets an unset max_norm
#pragma once

#include "engine.h"

namespace ff {

struct FromageRule {
  static constexpr const char* kName = "fromage";
  static constexpr int kPasses = 2;
  // Packed hyper-parameters (Spec.pack order).
  enum Hyper : int { kLr = 0, kPBound = 1 };
  // Flag bits: the spec's, then the rule's own (flags.py).
  enum Flag : int64_t { kMaximize = 1, kPrefactor = 2, kBound = 4, kInner = 8 };
  static constexpr int kHyper = 2;  // packed values
  static constexpr int kLrSlot = kLr;  // a pass that writes skips where lr is not usable
  static FF_HD constexpr bool rounds(int) { return true; }  // stochastic rounding in every writing pass
  // Per-tensor scalar states, in the order the rule declares them, and how many a step carries.
  enum Scalar : int { kMaxNorm = 0 };
  static constexpr const char* kScalarNames[] = {"max_norm"};
  static FF_HD int scalars(int64_t flags) { return (flags & kBound) ? 1 : 0; }
  static int kernel_pass(int64_t index, int64_t) { return static_cast<int>(index); }

  // p <- round(round(cp * p) + round(cg * g)).
  struct Coef {
    float cp;
    float cg;
    float max_norm;  // the tensor's max_norm after this step (meaningful with p_bound only)
  };

  // One rounding per operation, in the order of rules/fromage/coefficients.py; change both.
  static FF_HD Coef coefficients(float s_pp, float s_gg, float s_pg, float lr, float grad_scale, bool has_grad_scale,
                                 bool has_p_bound, float p_bound, float max_norm, bool maximize, bool prefactor) {
    const bool both = (s_pp > 0.f) && (s_gg > 0.f);
    const float root_p = sqrt_rn(s_pp);
    float a;
    if (both) {
      a = div_rn(mul_rn(lr, root_p), sqrt_rn(s_gg));
    } else {
      a = has_grad_scale ? div_rn(lr, grad_scale) : lr;
    }
    if (maximize) a = -a;
    float s = prefactor ? div_rn(1.f, sqrt_rn(add_rn(1.f, mul_rn(lr, lr)))) : 1.f;
    float mn = max_norm;
    if (has_p_bound) {
      if (mn < 0.f) mn = mul_rn(p_bound, root_p);
      // s*s * (s_pp - 2a*s_pg + a*a*s_gg)
      const float inner = add_rn(sub_rn(s_pp, mul_rn(mul_rn(2.f, a), s_pg)), mul_rn(mul_rn(a, a), s_gg));
      const float norm_sq = mul_rn(mul_rn(s, s), inner);
      const float norm = sqrt_rn(norm_sq > 0.f ? norm_sq : 0.f);
      if (norm > mn) s = div_rn(mul_rn(s, mn), norm);
    }
    Coef c;
    c.cp = s;
    c.cg = mul_rn(-a, s);
    c.max_norm = mn;
    return c;
  }

  template <class V>
  static FF_HD V update(const Coef& c, V p, V g) {
    return add_rn(mul_rn(V(c.cp), p), mul_rn(V(c.cg), g));
  }

  template <int P>
  struct Pass;
};

template <>
struct FromageRule::Pass<0> {
  static constexpr int kLists = 2, kWrites = 0, kSums = 3, kSumsIn = 0, kGlobals = 0;
  static FF_HD constexpr bool param_list(int) { return true; }
  struct Coef {
    bool inner;
  };
  static FF_HD Coef coefficients(const StepArgs& a, int64_t) { return Coef{(a.flags & kInner) != 0}; }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 2>& x, Vals<V, 3>& acc) {
    fma_acc(acc[0], x[0], x[0]);
    fma_acc(acc[1], x[1], x[1]);
    if (c.inner) fma_acc(acc[2], x[0], x[1]);
  }
};

template <>
struct FromageRule::Pass<1> {
  static constexpr int kLists = 2, kWrites = 1, kSums = 0, kSumsIn = 3, kGlobals = 0;
  static FF_HD constexpr bool param_list(int) { return true; }
  using Coef = FromageRule::Coef;
  static FF_HD Coef coefficients(const StepArgs& a, int64_t t) {
    const float* row = a.sums + 3 * t;
    const bool bounded = (a.flags & kBound) != 0;
    const float old = bounded ? read_scalar(a, kMaxNorm, t) : 0.f;
    return FromageRule::coefficients(row[0], row[1], row[2], a.hyper[kLr], a.grad_scale ? *a.grad_scale : 1.f,
                                     a.grad_scale != nullptr, bounded, a.hyper[kPBound], old,
                                     (a.flags & kMaximize) != 0, (a.flags & kPrefactor) != 0);
  }
  static FF_HD void store(const StepArgs& a, int64_t t, const Coef& c) {
    // Only an unset bound is written (every later step reads the same value): store() runs before
    // the tensor's other blocks have all read it.
    if ((a.flags & kBound) && read_scalar(a, kMaxNorm, t) < 0.f) write_scalar(a, kMaxNorm, t, c.max_norm);
  }
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 2>& x, Vals<V, 0>&) {
    x[0] = FromageRule::update(c, x[0], x[1]);
  }
};

}  // namespace ff
