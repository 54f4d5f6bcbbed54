// The LAMB rule in C++: its hyper-parameter slots and flag bits (in the order of
// fromage_fused/rules/lamb: the spec and flags.py), its per-tensor coefficients (one
// __host__ __device__ function per pass) and its elementwise bodies, the arithmetic of
// rules/lamb/foreach.py in the same order. See engine.h for what a rule provides.
//
//   kernel pass 0  grad_norm: lists g; sums ||g / grad_scale||^2 (combined over all groups in Python)
//   kernel pass 1  moments: lists m, v (written), p, g; sums ||p||^2, ||a||^2 (and, in kernel pass 6,
//                  with caution: <a, p>, sum k, elements)
//   kernel pass 2  moments without p (caution without adapting): lists m, v (written), g; kernel pass
//                  7 the same without caution (Adam that rounds stochastically)
//   kernel pass 3  apply: lists p (written), m, v
//   kernel pass 4  apply with caution: lists p (written), m, v, g
//   kernel pass 5  adam (neither adapting nor caution): lists p, m, v (written), g
// The step's per-group values come as six globals (LambRule.kernel_globals in Python, on the
// device): the gradients' divisor (grad_scale times the clip divisor), the bias corrections
// 1 - b1^t and sqrt(1 - b2^t), the decoupled decay's factor, and the moments' weights of the new
// gradient, 1 - b1 (1 without grad_averaging) and 1 - b2 (from float64, as the Python backends).
#pragma once

#include "engine.h"

namespace ff {

struct LambRule {
  static constexpr const char* kName = "lamb";
  static constexpr int kPasses = 8;
  enum Hyper : int { kLr = 0, kBeta1 = 1, kBeta2 = 2, kEps = 3, kWeightDecay = 4 };
  enum Flag : int64_t {
    kBiasCorrection = 1,
    kGradAveraging = 2,
    kTrustClip = 4,
    kAlwaysAdapt = 8,
    kCaution = 16,
    kDecoupledDecay = 32,
    kCorrectedWeightDecay = 64,
    kClip = 128,
    kAdapt = 256,
    kNorms = 512,
    kPlain = 1024,
    kMonitor = 2048,
  };
  static constexpr int kHyper = 7;
  static constexpr int kLrSlot = kLr;
  // Not in the one-pass Adam (kernel pass 5: three written lists leave no registers for the hash);
  // a group that rounds stochastically runs the moments and update passes instead (LambRule.flags).
  static FF_HD constexpr bool rounds(int kernel_pass) { return kernel_pass != 5; }
  static constexpr const char* kScalarNames[] = {"(none)"};
  static FF_HD int scalars(int64_t) { return 0; }
  enum Global : int { kDivisor = 0, kC1 = 1, kSqrtC2 = 2, kDecay = 3, kIntoM = 4, kIntoV = 5 };
  static constexpr int kGlobalCount = 6;
  enum Sum : int { kPP = 0, kAA = 1, kAP = 2, kAgree = 3, kElements = 4 };
  static constexpr float kCautionFloor = 1e-3f;
  static int kernel_pass(int64_t index, int64_t flags) {
    switch (index) {
      case 0: return 0;
      case 1: return (flags & kAdapt) ? ((flags & kCaution) ? 6 : 1) : ((flags & kCaution) ? 2 : 7);
      case 2: return (flags & kCaution) ? 4 : 3;
      default: return 5;
    }
  }

  // What every element of a group needs to recompute u = (m / c1) / (sqrt(v) / sqrt(c2) + eps). The
  // per-group divisors become products with their reciprocals (once per tensor): an element then
  // divides once, by its denominator, as fused AdamW does (on 2 CPU cores seven vector divisions an
  // element made the passes wait on the divider).
  struct Moments {
    float inv_divisor, b1, into_m, b2, into_v, inv_c1, inv_sqrt_c2, eps, coupled;
    bool caution, adapt;
    // Whether the moments pass sums <a, p>: a cautious update's norm needs it with a coupled decay,
    // the monitor's change of p with a decoupled one (rules/lamb/passes.py: sums_inner).
    bool inner;
  };

  static FF_HD Moments moments(const StepArgs& a) {
    const float* h = a.hyper;
    const float* g = a.globals;
    Moments c;
    c.inv_divisor = div_rn(1.f, g[kDivisor]);
    c.b1 = h[kBeta1];
    c.into_m = g[kIntoM];
    c.b2 = h[kBeta2];
    c.into_v = g[kIntoV];
    c.inv_c1 = div_rn(1.f, g[kC1]);
    c.inv_sqrt_c2 = div_rn(1.f, g[kSqrtC2]);
    c.eps = h[kEps];
    const bool decoupled = (a.flags & kDecoupledDecay) && h[kWeightDecay] != 0.f;
    c.coupled = decoupled ? 0.f : h[kWeightDecay];
    c.caution = (a.flags & kCaution) != 0;
    c.adapt = (a.flags & kAdapt) != 0;
    c.inner = (c.caution && c.coupled != 0.f) || ((a.flags & kMonitor) && (a.flags & kDecoupledDecay));
    return c;
  }

  template <class V>
  static FF_HD V grad(const Moments& c, V g) {
    return mul_rn(g, V(c.inv_divisor));
  }
  // m and v updated in place.
  template <class V>
  static FF_HD void update_moments(const Moments& c, V& m, V& v, V g) {
    m = add_rn(mul_rn(m, V(c.b1)), mul_rn(g, V(c.into_m)));
    v = add_rn(mul_rn(v, V(c.b2)), mul_rn(mul_rn(g, V(c.into_v)), g));
  }
  template <class V>
  static FF_HD V update(const Moments& c, V m, V v) {
    const V den = add_rn(mul_rn(sqrt_rn(v), V(c.inv_sqrt_c2)), V(c.eps));
    return div_rn(mul_rn(m, V(c.inv_c1)), den);
  }

  // Moments: m, v and the sums; P (a list index or -1) says where p is among the lists. Caution is a
  // template argument: without it three of the five accumulators stay zero, and the compiler
  // keeps only two live in the CPU's vector loops (sixteen vector registers).
  template <bool Caution, int P, int G, class V, int L>
  static FF_HD void moments_body(const Moments& c, Vals<V, L>& x, Vals<V, 5>& acc) {
    const V g = grad(c, x[G]);
    update_moments(c, x[0], x[1], g);
    V a = update(c, x[0], x[1]);
    if constexpr (Caution) {
      const V k = positive(mul_rn(a, g));
      a = mul_rn(a, k);
      fma_acc(acc[kAgree], k, V(1.f));
      fma_acc(acc[kElements], V(1.f), V(1.f));
    } else if constexpr (P >= 0) {
      if (c.coupled != 0.f) a = add_rn(a, mul_rn(x[P], V(c.coupled)));
    }
    if constexpr (P >= 0) {
      if (c.inner) fma_acc(acc[kAP], a, x[P]);
      if (c.adapt) fma_acc(acc[kPP], x[P], x[P]);
    }
    fma_acc(acc[kAA], a, a);
  }

  // Apply: p <- p - step * (u * k / share + coupled * p), after p <- p - decay * p.
  struct Apply {
    Moments m;
    float share, step, decay;
    bool decoupled;
  };

  static FF_HD Apply apply(const StepArgs& a, int64_t t) {
    Apply c;
    c.m = moments(a);
    const float* row = a.sums + 5 * t;
    const float lr = a.hyper[kLr];
    c.decay = a.globals[kDecay];
    c.decoupled = (a.flags & kDecoupledDecay) && a.hyper[kWeightDecay] != 0.f;
    c.share = 1.f;
    if (c.m.caution && row[kElements] > 0.f) {
      const float share = div_rn(row[kAgree], row[kElements]);
      c.share = share > kCautionFloor ? share : kCautionFloor;
    }
    c.step = lr;
    if (c.m.adapt) {
      float p_norm = sqrt_rn(row[kPP]);
      if (c.decoupled) {
        const float kept = sub_rn(1.f, c.decay);
        p_norm = mul_rn(p_norm, kept < 0.f ? -kept : kept);
      }
      float u_norm;
      if (c.m.caution) {
        const float w = c.m.coupled;
        const float u_sq = add_rn(add_rn(div_rn(row[kAA], mul_rn(c.share, c.share)),
                                         div_rn(mul_rn(mul_rn(2.f, w), row[kAP]), c.share)),
                                  mul_rn(mul_rn(w, w), row[kPP]));
        u_norm = sqrt_rn(u_sq > 0.f ? u_sq : 0.f);
      } else {
        u_norm = sqrt_rn(row[kAA]);
      }
      float r = (p_norm > 0.f && u_norm > 0.f) ? div_rn(p_norm, u_norm) : 1.f;
      if ((a.flags & kTrustClip) && r > 1.f) r = 1.f;
      c.step = mul_rn(lr, r);
    }
    return c;
  }

  template <class V>
  static FF_HD V apply_body(const Apply& c, V p, V m, V v, const V* g) {
    V u = update(c.m, m, v);
    if (g != nullptr) {
      u = mul_rn(u, positive(mul_rn(u, grad(c.m, *g))));
      u = div_rn(u, V(c.share));
    }
    if (c.m.coupled != 0.f) u = add_rn(u, mul_rn(p, V(c.m.coupled)));
    if (c.decoupled) p = sub_rn(p, mul_rn(p, V(c.decay)));
    return sub_rn(p, mul_rn(u, V(c.step)));
  }

  template <int P>
  struct Pass;
};

template <>
struct LambRule::Pass<0> {
  static constexpr int kLists = 1, kWrites = 0, kSums = 1, kSumsIn = 0, kGlobals = 0;
  static FF_HD constexpr bool param_list(int) { return true; }
  // A product by 1 / grad_scale, not a division (which spills registers in the 16-bit CUDA kernels'
  // wide staging); GradScaler's scales are powers of two, where both are exact.
  struct Coef {
    float inverse_scale;
  };
  static FF_HD Coef coefficients(const StepArgs& a, int64_t) {
    return Coef{a.grad_scale ? div_rn(1.f, *a.grad_scale) : 1.f};
  }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 1>& x, Vals<V, 1>& acc) {
    const V g = mul_rn(x[0], V(c.inverse_scale));
    fma_acc(acc[0], g, g);
  }
};

template <bool Caution>
struct LambMomentsWithP {  // m, v, p, g
  static constexpr int kLists = 4, kWrites = 2, kSums = 5, kSumsIn = 0, kGlobals = LambRule::kGlobalCount;
  static FF_HD constexpr bool param_list(int k) { return k >= 2; }
  using Coef = LambRule::Moments;
  static FF_HD Coef coefficients(const StepArgs& a, int64_t) { return LambRule::moments(a); }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 4>& x, Vals<V, 5>& acc) {
    LambRule::moments_body<Caution, 2, 3>(c, x, acc);
  }
};

template <>
struct LambRule::Pass<1> : LambMomentsWithP<false> {};
template <>
struct LambRule::Pass<6> : LambMomentsWithP<true> {};

template <bool Caution>
struct LambMomentsWithoutP {  // m, v, g
  static constexpr int kLists = 3, kWrites = 2, kSums = 5, kSumsIn = 0, kGlobals = LambRule::kGlobalCount;
  static FF_HD constexpr bool param_list(int k) { return k == 2; }
  using Coef = LambRule::Moments;
  static FF_HD Coef coefficients(const StepArgs& a, int64_t) { return LambRule::moments(a); }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 3>& x, Vals<V, 5>& acc) {
    LambRule::moments_body<Caution, -1, 2>(c, x, acc);
  }
};

template <>
struct LambRule::Pass<2> : LambMomentsWithoutP<true> {};  // caution without adapting
template <>
struct LambRule::Pass<7> : LambMomentsWithoutP<false> {};  // neither (Adam rounding stochastically)

template <>
struct LambRule::Pass<3> {  // p, m, v
  static constexpr int kLists = 3, kWrites = 1, kSums = 0, kSumsIn = 5, kGlobals = kGlobalCount;
  static FF_HD constexpr bool param_list(int k) { return k == 0; }
  using Coef = LambRule::Apply;
  static FF_HD Coef coefficients(const StepArgs& a, int64_t t) { return LambRule::apply(a, t); }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 3>& x, Vals<V, 0>&) {
    x[0] = LambRule::apply_body<V>(c, x[0], x[1], x[2], nullptr);
  }
};

template <>
struct LambRule::Pass<4> {  // p, m, v, g
  static constexpr int kLists = 4, kWrites = 1, kSums = 0, kSumsIn = 5, kGlobals = kGlobalCount;
  static FF_HD constexpr bool param_list(int k) { return k == 0 || k == 3; }
  using Coef = LambRule::Apply;
  static FF_HD Coef coefficients(const StepArgs& a, int64_t t) { return LambRule::apply(a, t); }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 4>& x, Vals<V, 0>&) {
    x[0] = LambRule::apply_body<V>(c, x[0], x[1], x[2], &x[3]);
  }
};

template <>
struct LambRule::Pass<5> {  // p, m, v, g: Adam with the clipped gradient
  static constexpr int kLists = 4, kWrites = 3, kSums = 0, kSumsIn = 0, kGlobals = kGlobalCount;
  static FF_HD constexpr bool param_list(int k) { return k == 0 || k == 3; }
  struct Coef {
    LambRule::Moments m;
    float lr;
  };
  static FF_HD Coef coefficients(const StepArgs& a, int64_t) { return Coef{LambRule::moments(a), a.hyper[kLr]}; }
  static FF_HD void store(const StepArgs&, int64_t, const Coef&) {}
  template <class V>
  static FF_HD void body(const Coef& c, Vals<V, 4>& x, Vals<V, 0>&) {
    LambRule::update_moments(c.m, x[1], x[2], LambRule::grad(c.m, x[3]));
    x[0] = sub_rn(x[0], mul_rn(LambRule::update(c.m, x[1], x[2]), V(c.lr)));
  }
};

}  // namespace ff
