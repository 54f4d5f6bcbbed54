"""The Fromage rule's Triton helpers: per-tensor coefficients and elementwise bodies of its passes.

The generic kernels (``engine_pass.py``) call them, passed as constexpr arguments: ``COEF`` once
per program (its tensor's coefficients, from the previous pass's sums), ``BODY`` on every block of
elements. The arithmetic is that of ``fromage_fused/rules/fromage/coefficients.py`` and
``csrc/rule_fromage.h``, one rounding per operation in the same order; pass 1 runs unfused
(``FUSION``), so ``x * cp + y * cg`` is two products and a sum, each rounded.
"""
import triton.language as tl

from .fromage_table import device_function, div_rn, sqrt_rn

# Slots of the packed hyper-parameters and flag bits (rules/fromage: the spec and flags.py).
LR = tl.constexpr(0)
P_BOUND = tl.constexpr(1)
MAXIMIZE = tl.constexpr(1)
PREFACTOR = tl.constexpr(2)
BOUND = tl.constexpr(4)
INNER = tl.constexpr(8)


@device_function
def coefficients_0(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    zero = tl.full((), 0.0, tl.float32)
    return zero, zero, zero, zero, zero, zero, zero, zero, zero, zero


@device_function
def body_0(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 0: the terms of ||p||^2, ||g||^2 and <p, g> (the last without INNER: zeros)."""
    if (INNER & FLAGS) != 0:
        pg = x * y
    else:
        pg = x * 0.0
    return x, y, y, x * x, y * y, pg, pg, pg


@device_function
def coefficients_1(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """``(c_p, c_g, 0, 0)`` of tensor ``t``; sets its unset max_norm (``s0``) from the first program."""
    s_pp = tl.load(sums_ptr + 3 * t)
    s_gg = tl.load(sums_ptr + 3 * t + 1)
    s_pg = tl.load(sums_ptr + 3 * t + 2)
    lr = tl.load(hyper_ptr + LR)
    both = (s_pp > 0) & (s_gg > 0)
    root_p = sqrt_rn(s_pp)
    scaled = div_rn(lr * root_p, sqrt_rn(tl.where(both, s_gg, tl.full((), 1.0, tl.float32))))
    fallback = lr
    if HAS_GRAD_SCALE:
        fallback = div_rn(lr, tl.load(grad_scale_ptr))
    a = tl.where(both, scaled, fallback)
    if (MAXIMIZE & FLAGS) != 0:
        a = -a
    s = tl.full((), 1.0, tl.float32)
    if (PREFACTOR & FLAGS) != 0:
        s = div_rn(tl.full((), 1.0, tl.float32), sqrt_rn(1.0 + lr * lr))
    if (BOUND & FLAGS) != 0:
        mn_ptr = s0_ptr + t
        # Every program of the tensor reads max_norm while, when it is unset, the first one writes
        # it; all compute the same value, so the others read the old (unset) or the new one and
        # agree. A relaxed load (ld.volatile, which the PTX memory model treats as ld.relaxed.sys)
        # and a relaxed atomic exchange: no data race.
        old = tl.load(mn_ptr, volatile=True)
        mn = tl.where(old < 0, tl.load(hyper_ptr + P_BOUND) * root_p, old)
        norm_sq = s * s * (s_pp - 2.0 * a * s_pg + a * a * s_gg)
        norm = sqrt_rn(tl.where(norm_sq > 0, norm_sq, tl.full((), 0.0, tl.float32)))
        clamp = norm > mn
        s = tl.where(clamp, div_rn(s * mn, tl.where(clamp, norm, tl.full((), 1.0, tl.float32))), s)
        if first & (old < 0):
            # On the bits (an int32 exchange): the interpreter exchanges no floats.
            tl.atomic_xchg(mn_ptr.to(tl.pointer_type(tl.int32)), mn.to(tl.int32, bitcast=True), sem="relaxed")
    zero = tl.full((), 0.0, tl.float32)
    return s, -a * s, zero, zero, zero, zero, zero, zero, zero, zero


@device_function
def body_1(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 1: ``p <- round(round(c_p p) + round(c_g g))`` (unfused: see ``FUSION``)."""
    zero = x * 0.0
    return x * k0 + y * k1, y, y, zero, zero, zero, zero, zero


#: per pass: (coefficients, body, whether the compiler may fuse multiply-adds)
PASSES = ((coefficients_0, body_0, True), (coefficients_1, body_1, False))
