"""Fromage's per-tensor coefficients from a group's sums, as tensor ops on the device (``foreach``
and monitoring; ``reference`` computes the same on the host in float64, ``csrc/rule_fromage.h`` and
``kernels/rule_fromage.py`` in the kernels).

The update of tensor i is ``p_i <- round(round(coef_p[i] * p_i) + round(coef_g[i] * g_i))`` in fp32
(two products and a sum, no fused multiply-add). For fp32 sums the coefficients are a fixed
sequence of correctly rounded fp32 operations (+, -, *, /, sqrt, compare, select). The C++, CUDA
and Triton kernels carry the same sequence in their own language, so that every backend's apply
pass gives the same bits from the same sums (docs/backends.md, "Bit-identical results").
"""
from __future__ import annotations

from typing import Optional

import torch

from ...engine.rounding import sqrt_rn
from ...engine.spec import FLOAT32_MAX, usable_lr  # noqa: F401  (the rule's lr guard)

#: A ``max_norm`` below zero means "not set yet": the first applied step sets it to
#: ``p_bound * ||p||`` measured before that step's update. A skipped step (found_inf) leaves it unset.
UNSET_MAX_NORM = -1.0


def coefficients(
    stats: torch.Tensor,
    lr: torch.Tensor,
    *,
    max_norm: Optional[torch.Tensor] = None,
    p_bound: Optional[float] = None,
    maximize: bool = False,
    prefactor: bool = True,
    grad_scale: Optional[torch.Tensor] = None,
):
    """Return ``(coef_p, coef_g, new_max_norm)`` for a group whose stats are ``stats`` ([n, 3]).

    ``stats[:, 0] = ||p||^2``, ``stats[:, 1] = ||g||^2``, ``stats[:, 2] = <p, g>``, all of the raw
    (possibly loss-scaled, not negated) gradient. ``lr`` is a 0-d tensor on the stats' device.
    ``new_max_norm`` is None without p_bound. No value is read on the host.

    Every line is one rounding, in the order of ``ff::FromageRule::coefficients``
    (csrc/rule_fromage.h) and of the Triton helper; change them together.
    """
    s_pp, s_gg, s_pg = stats.unbind(1)
    lr = lr.to(stats.dtype)
    one = torch.ones((), dtype=stats.dtype, device=stats.device)
    both = (s_pp > 0) & (s_gg > 0)
    # lr * ||p|| / ||g||: sqrt(s_pp / s_gg) would overflow/underflow earlier than the ratio of the roots.
    root_p, root_g = sqrt_rn(torch.stack((s_pp, torch.where(both, s_gg, one)))).unbind(0)
    scaled = lr * root_p / root_g
    fallback = lr if grad_scale is None else lr / grad_scale.to(stats.dtype)
    a = torch.where(both, scaled, fallback)
    # A maximising step moves along -(-g) = +g; its inner product with p changes sign.
    if maximize:
        a = -a
    s = one / sqrt_rn(one + lr * lr) if prefactor else one
    s = s.expand_as(a)
    new_max_norm = None
    if p_bound is not None:
        if max_norm is None:
            raise ValueError("p_bound is set but no max_norm tensor was given")
        mn = max_norm.to(stats.dtype)
        # Rounded to the float32 of the state first, so the first step clamps to what later ones see.
        first = (p_bound * root_p).to(torch.float32).to(stats.dtype)
        mn = torch.where(mn < 0, first, mn)
        norm_sq = s * s * (s_pp - 2 * a * s_pg + a * a * s_gg)
        norm = sqrt_rn(torch.where(norm_sq > 0, norm_sq, 0))
        clamp = norm > mn
        s = torch.where(clamp, s * mn / torch.where(clamp, norm, one), s)
        new_max_norm = mn
    return s, -a * s, new_max_norm
