// The LARS rule in C++: its hyper-parameter slots and flag bits (in the order of
// fromage_fused/rules/lars: the spec and flags.py), its per-tensor coefficients (one
// __host__ __device__ function, the arithmetic of rules/lars/foreach.py in the same order) and
// its elementwise bodies. See engine.h for what a rule provides.
//
//   kernel pass 0  lists p, g; sums ||p||^2, ||g||^2 (run only when adapting: Pass.when)
//   kernel pass 1  lists p, buf (written), g; with momentum
//   kernel pass 2  lists p (written), g; without momentum (the buffer list is absent)
//   kernel pass 3, 4  kernel passes 1, 2 monitored: they also sum ||u||^2 of the step p <- p - lr * u
// The rule's Python pass 1 is kernel pass 1 to 4 (kernel_pass). momentum_started is read here and
// set by the engine after the step (TensorScalar.after).
#pragma once

#include "engine.h"

namespace ff {

struct LarsRule {
  static constexpr const char* kName = "lars";
  static constexpr int kPasses = 5;
  enum Hyper : int { kLr = 0, kMomentum = 1, kDampening = 2, kWeightDecay = 3, kTrustCoeff = 4, kEps = 5 };
  enum Flag : int64_t { kNesterov = 1, kTrustClip = 2, kAlwaysAdapt = 4, kMomentumOn = 8, kAdapt = 16, kMonitor = 32 };
  static constexpr int kHyper = 6;
  static constexpr int kLrSlot = kLr;
  static FF_HD constexpr bool rounds(int) { return true; }
  enum Scalar : int { kStarted = 0 };
  static constexpr const char* kScalarNames[] = {"momentum_started"};
  static FF_HD int scalars(int64_t flags) { return (flags & kMomentumOn) ? 1 : 0; }
  static int kernel_pass(int64_t index, int64_t flags) {
    if (index != 1) return static_cast<int>(index);
    return ((flags & kMomentumOn) ? 1 : 2) + ((flags & kMonitor) ? 2 : 0);
  }

  // d = round(cg * g) + round(cp * p); buf <- round(a * buf) + round(b * d);
  // u = d + round(mu * buf) (nesterov) or buf; p <- p - round(lr * u).
  struct Coef {
    float cg, cp, a, b, mu, lr;
    bool decay, nesterov;
  };

  static FF_HD Coef coefficients(const StepArgs& args, int64_t t, bool momentum) {
    const float* h = args.hyper;
    const float scale = args.grad_scale ? *args.grad_scale : 1.f;
    const float lr = h[kLr], wd = h[kWeightDecay];
    Coef c;
    c.lr = lr;
    c.mu = h[kMomentum];
    c.nesterov = (args.flags & kNesterov) != 0;
    c.decay = false;
    c.cp = 0.f;
    if (args.flags & kAdapt) {
      const float* row = args.sums + 2 * t;
      const float p_norm = sqrt_rn(row[0]);
      const float g_norm = div_rn(sqrt_rn(row[1]), scale);
      float r = 1.f;
      if (p_norm > 0.f && g_norm > 0.f)
        r = div_rn(mul_rn(h[kTrustCoeff], p_norm), add_rn(add_rn(g_norm, mul_rn(wd, p_norm)), h[kEps]));
      if (args.flags & kTrustClip) {
        const float q = div_rn(r, lr);  // lr = 0: +inf, so 1
        r = q < 1.f ? q : 1.f;
      }
      c.cg = div_rn(r, scale);
      c.cp = mul_rn(r, wd);
      c.decay = wd != 0.f;
    } else {
      c.cg = div_rn(1.f, scale);
    }
    if (momentum) {
      const bool on = read_scalar(args, kStarted, t) > 0.f;
      c.a = on ? c.mu : 0.f;
      c.b = on ? sub_rn(1.f, h[kDampening]) : 1.f;
    } else {
      c.a = 0.f;
      c.b = 1.f;
    }
    return c;
  }

  template <class V>
  static FF_HD V direction(const Coef& c, V p, V g) {
    const V d = mul_rn(V(c.cg), g);
    return c.decay ? add_rn(d, mul_rn(V(c.cp), p)) : d;
  }

  template <int P>
  struct Pass;
};

template <>
struct LarsRule::Pass<0> {
  static constexpr int kLists = 2, kWrites = 0, kSums = 2, kSumsIn = 0, kGlobals = 0;
  static FF_HD constexpr bool param_list(int) { return true; }
  struct Coef {};
  static FF_HD Coef coefficients(const StepArgs&, int64_t) { return Coef{}; }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef&, Vals<V, 2>& x, Vals<V, 2>& acc) {
    fma_acc(acc[0], x[0], x[0]);
    fma_acc(acc[1], x[1], x[1]);
  }
};

// The update with momentum; S = 1: monitored (the sum of u * u).
template <int S>
struct LarsMomentum {
  static constexpr int kLists = 3, kWrites = 2, kSums = S, kSumsIn = 2, kGlobals = 0;
  // p, g: the parameters' dtype; the buffer: float32 for bf16/fp16 parameters
  static FF_HD constexpr bool param_list(int k) { return k != 1; }
  using Coef = LarsRule::Coef;
  static FF_HD Coef coefficients(const StepArgs& a, int64_t t) { return LarsRule::coefficients(a, t, true); }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 3>& x, Vals<V, S>& acc) {
    const V d = LarsRule::direction(c, x[0], x[2]);
    const V buf = add_rn(mul_rn(V(c.a), x[1]), mul_rn(V(c.b), d));
    const V u = c.nesterov ? add_rn(d, mul_rn(V(c.mu), buf)) : buf;
    if constexpr (S > 0) fma_acc(acc[0], u, u);
    x[1] = buf;
    x[0] = sub_rn(x[0], mul_rn(V(c.lr), u));
  }
};

// The update without momentum; S = 1: monitored (bf16 parameters spilled 8 bytes on sm_80 and sm_90
// at the engine's full staging).
template <int S>
struct LarsPlain {
  static constexpr int kLists = 2, kWrites = 1, kSums = S, kSumsIn = 2, kGlobals = 0;
  static constexpr bool kStageHalf = S > 0;
  static FF_HD constexpr bool param_list(int) { return true; }
  using Coef = LarsRule::Coef;
  static FF_HD Coef coefficients(const StepArgs& a, int64_t t) { return LarsRule::coefficients(a, t, false); }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 2>& x, Vals<V, S>& acc) {
    const V u = LarsRule::direction(c, x[0], x[1]);
    if constexpr (S > 0) fma_acc(acc[0], u, u);
    x[0] = sub_rn(x[0], mul_rn(V(c.lr), u));
  }
};

template <>
struct LarsRule::Pass<1> : LarsMomentum<0> {};
template <>
struct LarsRule::Pass<2> : LarsPlain<0> {};
template <>
struct LarsRule::Pass<3> : LarsMomentum<1> {};
template <>
struct LarsRule::Pass<4> : LarsPlain<1> {};

}  // namespace ff
