"""The per-tensor coefficients of one Fromage step, derived from the stats on the device.

Every backend that does its arithmetic with torch ops (foreach, and the host side of tests for the
kernels) uses these; the Triton and CUDA kernels carry the same formulas in their own language.
The update of tensor i is ``p_i <- coef_p[i] * p_i + coef_g[i] * g_i``.
"""
from __future__ import annotations

from typing import Optional

import torch

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
    """
    s_pp, s_gg, s_pg = stats.unbind(1)
    lr = lr.to(stats.dtype)
    both = (s_pp > 0) & (s_gg > 0)
    # sqrt(s_pp / s_gg) would overflow/underflow earlier than the ratio of the roots.
    scaled = lr * torch.sqrt(s_pp) / torch.where(both, torch.sqrt(s_gg), torch.ones_like(s_gg))
    fallback = lr if grad_scale is None else lr / grad_scale.to(stats.dtype)
    a = torch.where(both, scaled, fallback)
    # A maximising step moves along -(-g) = +g; its inner product with p changes sign.
    if maximize:
        a = -a
    s = torch.rsqrt(1 + lr * lr) if prefactor else torch.ones_like(lr)
    s = s.expand_as(a)
    new_max_norm = None
    if p_bound is not None:
        if max_norm is None:
            raise ValueError("p_bound is set but no max_norm tensor was given")
        mn = max_norm.to(stats.dtype)
        mn = torch.where(mn < 0, p_bound * torch.sqrt(s_pp), mn)
        norm_sq = s * s * (s_pp - 2 * a * s_pg + a * a * s_gg)
        norm = torch.sqrt(torch.clamp(norm_sq, min=0))
        clamp = norm > mn
        s = torch.where(clamp, s * mn / torch.where(clamp, norm, torch.ones_like(norm)), s)
        new_max_norm = mn
    return s, -a * s, new_max_norm
