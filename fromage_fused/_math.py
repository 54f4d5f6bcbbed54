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


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, inner products and the update's arithmetic: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        # Rounded to the float32 of the state first, so the first step clamps to what later ones see.
        first = (p_bound * torch.sqrt(s_pp)).to(torch.float32).to(stats.dtype)
        mn = torch.where(mn < 0, first, mn)
        norm_sq = s * s * (s_pp - 2 * a * s_pg + a * a * s_gg)
        norm = torch.sqrt(torch.clamp(norm_sq, min=0))
        clamp = norm > mn
        s = torch.where(clamp, s * mn / torch.where(clamp, norm, torch.ones_like(norm)), s)
        new_max_norm = mn
    return s, -a * s, new_max_norm


# Stochastic rounding of fp32 results to bf16: one counter-based hash per element, the same in
# every backend (torch here; Triton and CUDA carry the same integer recipe), so that results are
# reproducible for a seed and comparable across backends bit for bit.
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on uint32 values held in int64 (only the low 32 bits matter)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def sr_stream(seed: torch.Tensor, tensor_index: int) -> torch.Tensor:
    """Per-tensor hash key: ``mix32(seed + tensor_index * 0x9E3779B9)`` (int64 holding uint32)."""
    return _mix32(seed.to(torch.int64) + tensor_index * _GOLDEN)


def stochastic_round_bf16(x: torch.Tensor, seed: torch.Tensor, tensor_index: int) -> torch.Tensor:
    """Round fp32 ``x`` to bf16, up or down with probability given by the distance (unbiased).

    Element ``i`` (flat, row-major) draws ``r = mix32(i ^ stream) & 0xFFFF`` with
    ``stream = sr_stream(seed, tensor_index)``, adds ``r`` to the fp32 bit pattern and truncates
    the low 16 bits. Non-finite values round to nearest.
    """
    flat = x.detach().reshape(-1).to(torch.float32)
    bits = flat.view(torch.int32).to(torch.int64) & _MASK32
    idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    r = _mix32(idx ^ sr_stream(seed, tensor_index)) & 0xFFFF
    rounded = ((bits + r) & 0xFFFF0000)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32).view(torch.float32)
    out = torch.where(torch.isfinite(flat), rounded, flat)
    return out.to(torch.bfloat16).reshape(x.shape)
