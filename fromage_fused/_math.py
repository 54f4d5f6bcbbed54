"""The per-tensor coefficients of one Fromage step, derived from the stats on the device, and the
rounding of fp32 results to bf16.

The update of tensor i is ``p_i <- round(round(coef_p[i] * p_i) + round(coef_g[i] * g_i))`` in fp32
(two products and a sum, no fused multiply-add). For fp32 stats the coefficients are a fixed
sequence of correctly rounded fp32 operations (+, -, *, /, sqrt, compare, select). The C++, CUDA
and Triton kernels carry the same sequence in their own language, so that every backend's apply
phase gives the same bits from the same stats (docs/backends.md, "Bit-identical results").
"""
from __future__ import annotations

from typing import Optional

import torch

#: A ``max_norm`` below zero means "not set yet": the first applied step sets it to
#: ``p_bound * ||p||`` measured before that step's update. A skipped step (found_inf) leaves it unset.
UNSET_MAX_NORM = -1.0
#: The largest float32: a step holds lr as a float32 tensor (float64 for float64 groups).
FLOAT32_MAX = 3.4028234663852886e38


def usable_lr(lr: torch.Tensor) -> torch.Tensor:
    """Whether a tensor lr can be stepped with (>= 0 and finite in float32; False for NaN), on its
    device. A tensor lr edited after construction is never read on the host: a step whose lr is not
    usable leaves every parameter and its state as they were, as a found_inf step does."""
    return (lr >= 0) & (lr <= FLOAT32_MAX)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, inner products and the update's arithmetic: fp64 for fp64 tensors, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of fp32 ``x`` (fp64: torch's own).

    torch's fp32 CPU ``sqrt`` is not correctly rounded (0.6% of all floats are 1 ulp off here,
    whatever the CPU capability). Its fp64 ``sqrt`` is within 1 ulp, and any fp64 square root
    within 3 ulps rounds to the correctly rounded fp32 one: sqrt(x) of a float lies at least
    2**-50 (relative) away from every midpoint between two floats.
    """
    if x.dtype == torch.float32:
        return torch.sqrt(x.double()).float()
    return torch.sqrt(x)


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

    Every line is one rounding, in the order of ``ff::coefficients`` (csrc/fromage_common.h) and
    of the Triton apply kernel; change them together.
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


# Rounding of fp32 results to bf16, in integer arithmetic on the bit patterns so that it is the same
# on every device and CPU capability (torch's own fp32 -> bf16 cast writes a NaN as 0xFFFF with its
# AVX2/AVX-512 kernels and as 0x7FC0 with its default ones). Stochastic rounding draws one
# counter-based hash per element; Triton, C++ and CUDA carry the same integer recipe.
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
#: Every NaN rounds to this bf16 bit pattern, the quiet NaN that torch's scalar cast writes.
BF16_NAN_BITS = 0x7FC0


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


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The fp32 bit patterns of ``x`` as non-negative int64."""
    return x.detach().reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64) & _MASK32


def _bf16_from_high_half(bits: torch.Tensor, rounded: torch.Tensor, shape) -> torch.Tensor:
    """bf16 whose bit patterns are the high halves of ``rounded`` (``bits`` plus a rounding
    increment below 2**16); where ``bits`` is a NaN, ``BF16_NAN_BITS``."""
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    high = torch.where(nan, BF16_NAN_BITS, rounded >> 16)
    high = torch.where(high >= 2**15, high - 2**16, high)
    return high.to(torch.int16).view(torch.bfloat16).reshape(shape)


def stochastic_round_bf16(x: torch.Tensor, seed: torch.Tensor, tensor_index: int) -> torch.Tensor:
    """Round fp32 ``x`` to bf16, up or down with probability given by the distance (unbiased).

    Element ``i`` (flat, row-major; only its low 32 bits count) draws ``r = mix32(i ^ stream) &
    0xFFFF`` with ``stream = sr_stream(seed, tensor_index)``, adds ``r`` to the fp32 bit pattern and
    keeps the high 16 bits. Infinities have zero low bits and stay; every NaN becomes
    ``BF16_NAN_BITS``; the largest finite values may round up to infinity.
    """
    bits = _bits(x)
    idx = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64)
    r = _mix32(idx ^ sr_stream(seed, tensor_index)) & 0xFFFF
    return _bf16_from_high_half(bits, bits + r, x.shape)


def nearest_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 ``x`` to bf16, to nearest with ties to even (the kernels' rounding without a seed);
    every NaN becomes ``BF16_NAN_BITS``. For non-NaN values this is torch's cast."""
    bits = _bits(x)
    return _bf16_from_high_half(bits, bits + 0x7FFF + ((bits >> 16) & 1), x.shape)
