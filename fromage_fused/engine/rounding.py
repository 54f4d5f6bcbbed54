"""Rounding, the same bits on every device: correctly rounded square roots, fp32 -> bf16 to nearest
or stochastically, and the seed of stochastic rounding.

bf16 rounding is integer arithmetic on the bit patterns, so that it is the same on every device
and CPU capability (torch's own fp32 -> bf16 cast writes a NaN as 0xFFFF with its AVX2/AVX-512
kernels and as 0x7FC0 with its default ones). Stochastic rounding draws one counter-based hash per
element; Triton, C++ and CUDA carry the same integer recipe, so equal fp32 inputs round to equal
bf16 bits in every backend.

Stochastic rounding is an engine option of every rule (the ``stochastic_rounding`` setting): it
gives each (param group, device) with bf16 parameters a seed, an int64 device tensor in the state
of the group's first bf16 parameter there, advanced on the device after every applied step.
"""
from __future__ import annotations

from typing import Optional

import torch

from .rule import GroupScalar
from .spec import applied, check_flag, setting

_MASK32 = 0xFFFFFFFF
_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B9
#: Every NaN rounds to this bf16 bit pattern, the quiet NaN that torch's scalar cast writes.
BF16_NAN_BITS = 0x7FC0


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


# -- the seed ---------------------------------------------------------------------------------------

def initial_seed(seed: Optional[int]) -> int:
    """An optimizer's base seed: ``seed`` when given, else a draw from torch's default generator
    (so ``torch.manual_seed`` makes a run reproducible)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return seed & _MASK63


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def group_seed(base: int, group_index: int, device: torch.device) -> int:
    """Distinct, well-mixed start values for the seed of each (param group, device)."""
    device_index = -1 if device.index is None else device.index
    return _splitmix64(_splitmix64(base) ^ _splitmix64((group_index << 8) ^ (device_index & 0xFF))) & _MASK63


def advance(counter: torch.Tensor, found_inf: Optional[torch.Tensor], by: int = 1, lr=None) -> None:
    """Move a per-group counter on by ``by`` on the device; a step skipped by ``found_inf`` or by an
    unusable tensor ``lr`` (``spec.applied``) leaves it."""
    keep = applied(found_inf, lr, counter.device)
    if keep is None:
        counter.add_(by)
    else:
        step = keep.to(counter.dtype)
        counter.add_(step * by if by != 1 else step)


def _seed_initial(opt, group_index: int, device: torch.device) -> int:
    return group_seed(opt._seed_base(), group_index, device)


def _is_bf16(p: torch.Tensor) -> bool:
    return p.dtype == torch.bfloat16


def _rounds(values, dtype: torch.dtype) -> bool:
    return bool(values["stochastic_rounding"]) and dtype == torch.bfloat16


#: The option every rule may offer: round bf16 results stochastically.
STOCHASTIC_ROUNDING = setting("stochastic_rounding", False, check_flag)
#: Its state: the seed of each (param group, device) with bf16 parameters.
SR_SEED = GroupScalar("sr_seed", torch.int64, anchor=_is_bf16, when=_rounds, initial=_seed_initial)
