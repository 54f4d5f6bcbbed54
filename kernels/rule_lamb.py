"""The LAMB rule's Triton helpers: per-tensor coefficients and elementwise bodies of its passes.

The arithmetic of ``csrc/rule_lamb.h``, one rounding per operation in the same order (the passes
that write run unfused: ``FUSION``), with the step's per-group values from ``globals``
(``LambRule.kernel_globals``: the gradients' divisor, ``1 − β1^t``, ``√(1 − β2^t)``, the decoupled
decay's factor, and the moments' weights of the new gradient):

    ĝ = g·(1/d)
    m = m·β1 + ĝ·(1 − β1)             v = v·β2 + (ĝ·(1 − β2))·ĝ
    u = (m·(1/c1)) / (√v·(1/√c2) + eps)

The lists follow the flags (the rule's optional lists): moments reads ``m, v, p, g`` when adapting
and ``m, v, g`` otherwise; the update reads ``p, m, v`` and, with ``caution``, ``g``.
"""
import triton.language as tl

from .fromage_table import device_function, div_rn, sqrt_rn

# Slots of the packed hyper-parameters, of the globals, and flag bits (rules/lamb: the spec,
# flags.py and foreach.kernel_globals).
LR = tl.constexpr(0)
BETA1 = tl.constexpr(1)
BETA2 = tl.constexpr(2)
EPS = tl.constexpr(3)
WD = tl.constexpr(4)
DIVISOR = tl.constexpr(0)
C1 = tl.constexpr(1)
SQRT_C2 = tl.constexpr(2)
DECAY = tl.constexpr(3)
INTO_M = tl.constexpr(4)
INTO_V = tl.constexpr(5)
TRUST_CLIP = tl.constexpr(4)
CAUTION = tl.constexpr(16)
DECOUPLED_DECAY = tl.constexpr(32)
ADAPT = tl.constexpr(256)
MONITOR = tl.constexpr(2048)
CAUTION_FLOOR = tl.constexpr(1e-3)


@device_function
def _inverse(ptr):
    return div_rn(tl.full((), 1.0, tl.float32), tl.load(ptr))


@device_function
def _coupled(hyper_ptr, FLAGS: tl.constexpr):
    """The weight decay inside u: none with a decoupled decay."""
    if (DECOUPLED_DECAY & FLAGS) != 0:
        return tl.full((), 0.0, tl.float32)
    return tl.load(hyper_ptr + WD)


@device_function
def _moment_values(hyper_ptr, globals_ptr):
    """``1/d, β1, 1 − β1, β2, 1 − β2, 1/c1, 1/√c2, eps``: what ``_moments`` takes as k0..k7."""
    return (_inverse(globals_ptr + DIVISOR), tl.load(hyper_ptr + BETA1), tl.load(globals_ptr + INTO_M),
            tl.load(hyper_ptr + BETA2), tl.load(globals_ptr + INTO_V), _inverse(globals_ptr + C1),
            _inverse(globals_ptr + SQRT_C2), tl.load(hyper_ptr + EPS))


@device_function
def _moments(m, v, g, k0, k1, k2, k3, k4, k5, k6, k7):
    """``(m, v, u, ĝ)`` after this step's gradient ``g``."""
    gg = g * k0
    m = m * k1 + gg * k2
    v = v * k3 + (gg * k4) * gg
    u = div_rn(m * k5, sqrt_rn(v) * k6 + k7)
    return m, v, u, gg


@device_function
def _mask(u, gg):
    """1 where the update agrees in sign with the gradient, else 0."""
    return tl.where(u * gg > 0, 1.0, 0.0)


@device_function
def coefficients_0(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """``1 / grad_scale`` (a product, as the C++ kernels: exact for GradScaler's powers of two)."""
    zero = tl.full((), 0.0, tl.float32)
    inverse_scale = tl.full((), 1.0, tl.float32)
    if HAS_GRAD_SCALE:
        inverse_scale = _inverse(grad_scale_ptr)
    return inverse_scale, zero, zero, zero, zero, zero, zero, zero, zero, zero


@device_function
def body_0(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 0 (``g``): the terms of ‖g / grad_scale‖²."""
    g = x * k0
    zero = x * 0.0
    return x, x, x, g * g, zero, zero, zero, zero


@device_function
def coefficients_1(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The moments' per-group values: ``1/d, β1, 1 − β1, β2, 1 − β2, 1/c1, 1/√c2, eps``, the coupled decay."""
    d, b1, into_m, b2, into_v, c1, c2, eps = _moment_values(hyper_ptr, globals_ptr)
    return d, b1, into_m, b2, into_v, c1, c2, eps, _coupled(hyper_ptr, FLAGS), tl.full((), 0.0, tl.float32)


@device_function
def body_1(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 1 (``m, v, p, g``, or ``m, v, g`` when not adapting): the new moments and the sums
    ‖p‖², ‖a‖², ⟨a, p⟩, the agreeing signs and the elements (a: the update as its norm is taken)."""
    zero = x * 0.0
    if (ADAPT & FLAGS) != 0:
        p = x2
        g = x3
    else:
        p = zero
        g = x2
    m, v, u, gg = _moments(x, y, g, k0, k1, k2, k3, k4, k5, k6, k7)
    a = u
    agree = zero
    elements = zero
    ap = zero
    if (CAUTION & FLAGS) != 0:
        agree = _mask(u, gg)
        a = u * agree
        elements = zero + 1.0
        ap = tl.where(k8 != 0, a * p, zero)
    else:
        a = tl.where(k8 != 0, u + p * k8, u)
    if (MONITOR & FLAGS) != 0 and (DECOUPLED_DECAY & FLAGS) != 0:
        ap = a * p  # the monitor's change of p (with a decoupled decay, a is u)
    pp = zero
    if (ADAPT & FLAGS) != 0:
        pp = p * p
    return m, v, v, pp, a * a, ap, agree, elements


@device_function
def coefficients_2(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """``1/c1, 1/√c2, eps``, the coupled decay, the decoupled decay's factor, ``lr·r`` (r the trust
    ratio from the moments' sums), the share of agreeing signs, ``1/d``."""
    one = tl.full((), 1.0, tl.float32)
    zero = tl.full((), 0.0, tl.float32)
    row = sums_ptr + 5 * t
    s_pp = tl.load(row)
    lr = tl.load(hyper_ptr + LR)
    coupled = _coupled(hyper_ptr, FLAGS)
    decay = zero
    if (DECOUPLED_DECAY & FLAGS) != 0:
        decay = tl.where(tl.load(hyper_ptr + WD) != 0, tl.load(globals_ptr + DECAY), zero)
    share = one
    if (CAUTION & FLAGS) != 0:
        elements = tl.load(row + 4)
        ratio = div_rn(tl.load(row + 3), tl.where(elements > 0, elements, one))
        share = tl.where(elements > 0, tl.maximum(ratio, CAUTION_FLOOR), one)
    step = lr
    if (ADAPT & FLAGS) != 0:
        p_norm = sqrt_rn(s_pp)
        if (DECOUPLED_DECAY & FLAGS) != 0:
            kept = 1.0 - decay
            p_norm = p_norm * tl.where(kept < 0, -kept, kept)
        if (CAUTION & FLAGS) != 0:
            u_sq = div_rn(tl.load(row + 1), share * share) + div_rn((2.0 * coupled) * tl.load(row + 2), share) + \
                (coupled * coupled) * s_pp
            u_norm = sqrt_rn(tl.where(u_sq > 0, u_sq, zero))
        else:
            u_norm = sqrt_rn(tl.load(row + 1))
        both = (p_norm > 0) & (u_norm > 0)
        r = tl.where(both, div_rn(p_norm, tl.where(both, u_norm, one)), one)
        if (TRUST_CLIP & FLAGS) != 0:
            r = tl.where(r > 1.0, one, r)
        step = lr * r
    return (_inverse(globals_ptr + C1), _inverse(globals_ptr + SQRT_C2), tl.load(hyper_ptr + EPS), coupled, decay,
            step, share, _inverse(globals_ptr + DIVISOR), zero, zero)


@device_function
def body_2(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 2 (``p, m, v``, and ``g`` with caution): ``p ← p − lr·r·(u·k / share + wd·p)`` after a
    decoupled decay."""
    u = div_rn(y * k0, sqrt_rn(x2) * k1 + k2)
    if (CAUTION & FLAGS) != 0:
        u = div_rn(u * _mask(u, x3 * k7), k6)
    u = tl.where(k3 != 0, u + x * k3, u)
    p = x
    if (DECOUPLED_DECAY & FLAGS) != 0:
        p = tl.where(k4 != 0, p - p * k4, p)
    zero = x * 0.0
    return p - u * k5, y, y, zero, zero, zero, zero, zero


@device_function
def coefficients_3(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """Adam's: the moments' values and lr."""
    d, b1, into_m, b2, into_v, c1, c2, eps = _moment_values(hyper_ptr, globals_ptr)
    return d, b1, into_m, b2, into_v, c1, c2, eps, tl.load(hyper_ptr + LR), tl.full((), 0.0, tl.float32)


@device_function
def body_3(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 3 (``p, m, v, g``; neither adapting nor cautious): Adam with the clipped gradient."""
    m, v, u, gg = _moments(y, x2, x3, k0, k1, k2, k3, k4, k5, k6, k7)
    zero = x * 0.0
    return x - u * k8, m, v, zero, zero, zero, zero, zero


#: per pass: (coefficients, body, whether the compiler may fuse multiply-adds)
PASSES = ((coefficients_0, body_0, True), (coefficients_1, body_1, False), (coefficients_2, body_2, False),
          (coefficients_3, body_3, False))
