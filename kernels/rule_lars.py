"""The LARS rule's Triton helpers: per-tensor coefficients and elementwise bodies of its passes.

The arithmetic of ``fromage_fused/rules/lars/foreach.py`` and ``csrc/rule_lars.h``, one rounding
per operation in the same order (pass 1 runs unfused: ``FUSION``):

    d   = round(c_g·g) + round(c_p·p)
    buf = round(a·buf) + round(b·d)                  (with momentum)
    u   = d + round(momentum·buf) if nesterov, else buf (d without momentum)
    p   = p - round(lr·u)

and, monitored, pass 1 also sums ‖u‖². Pass 1's lists are ``p, buf, g`` with momentum and ``p, g``
without (the rule's optional list); ``momentum_started`` (``s0``) is read here and set by the
engine after the step.
"""
import triton.language as tl

from .fromage_table import device_function, div_rn, sqrt_rn

# Slots of the packed hyper-parameters and flag bits (rules/lars: the spec and flags.py).
LR = tl.constexpr(0)
MU = tl.constexpr(1)
DAMPENING = tl.constexpr(2)
WD = tl.constexpr(3)
TRUST_COEFF = tl.constexpr(4)
EPS = tl.constexpr(5)
NESTEROV = tl.constexpr(1)
TRUST_CLIP = tl.constexpr(2)
MOMENTUM = tl.constexpr(8)
ADAPT = tl.constexpr(16)
MONITOR = tl.constexpr(32)


@device_function
def coefficients_0(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    zero = tl.full((), 0.0, tl.float32)
    return zero, zero, zero, zero, zero, zero, zero, zero, zero, zero


@device_function
def body_0(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 0: the terms of ||p||^2 and ||g||^2."""
    zero = x * 0.0
    return x, y, y, x * x, y * y, zero, zero, zero


@device_function
def coefficients_1(t, first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr, grad_scale_ptr,
                   FLAGS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """``(c_g, c_p, a, b, momentum, lr)`` of tensor ``t``; ``c_p`` is 0 without weight decay's term."""
    one = tl.full((), 1.0, tl.float32)
    zero = tl.full((), 0.0, tl.float32)
    lr = tl.load(hyper_ptr + LR)
    mu = tl.load(hyper_ptr + MU)
    scale = one
    if HAS_GRAD_SCALE:
        scale = tl.load(grad_scale_ptr)
    c_g = div_rn(one, scale)
    c_p = zero
    if (ADAPT & FLAGS) != 0:
        wd = tl.load(hyper_ptr + WD)
        p_norm = sqrt_rn(tl.load(sums_ptr + 2 * t))
        g_norm = div_rn(sqrt_rn(tl.load(sums_ptr + 2 * t + 1)), scale)
        both = (p_norm > 0) & (g_norm > 0)
        denominator = tl.where(both, g_norm + wd * p_norm + tl.load(hyper_ptr + EPS), one)
        r = tl.where(both, div_rn(tl.load(hyper_ptr + TRUST_COEFF) * p_norm, denominator), one)
        if (TRUST_CLIP & FLAGS) != 0:
            q = div_rn(r, lr)  # lr = 0: +inf, so 1
            r = tl.where(q < 1.0, q, one)
        c_g = div_rn(r, scale)
        c_p = r * wd
    a = zero
    b = one
    if (MOMENTUM & FLAGS) != 0:
        on = tl.load(s0_ptr + t) > 0
        a = tl.where(on, mu, zero)
        b = tl.where(on, 1.0 - tl.load(hyper_ptr + DAMPENING), one)
    zero = tl.full((), 0.0, tl.float32)
    return c_g, c_p, a, b, mu, lr, zero, zero, zero, zero


@device_function
def body_1(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x, y, x2, x3, FLAGS: tl.constexpr):
    """Pass 1: the update of ``p`` (``x``) and, with momentum, of the buffer (``y``; ``g`` is ``x2``)."""
    if (MOMENTUM & FLAGS) != 0:
        g = x2
    else:
        g = y
    d = g * k0
    d = tl.where(k1 != 0, d + x * k1, d)
    if (MOMENTUM & FLAGS) != 0:
        buf = y * k2 + d * k3
        if (NESTEROV & FLAGS) != 0:
            u = d + buf * k4
        else:
            u = buf
    else:
        u = d
    zero = x * 0.0
    uu = zero
    if (MONITOR & FLAGS) != 0:
        uu = u * u  # the monitor's ‖u‖²
    if (MOMENTUM & FLAGS) != 0:
        return x - u * k5, buf, buf, uu, zero, zero, zero, zero
    return x - u * k5, y, y, uu, zero, zero, zero, zero


#: per pass: (coefficients, body, whether the compiler may fuse multiply-adds)
PASSES = ((coefficients_0, body_0, True), (coefficients_1, body_1, False))
