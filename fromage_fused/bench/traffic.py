"""Bytes per parameter, and the bandwidth arithmetic of the report.

Counts are for fp32 parameters (4 bytes each read or write) and scale with the element size.
``work`` is what the algorithm needs at the least (the yardstick for GB/s); ``traffic`` is what an
implementation moves by its design (nominal: caches may save some of it).
"""
from __future__ import annotations

from typing import Optional

import torch

#: Fromage as two phases: stats read p and g (8), apply reads p and g and writes p (12).
FROMAGE_TWO_PHASE = 20
#: One pass that reads p and g and writes p: what SGD without momentum needs, the floor of any step.
SGD = 12
#: AdamW: reads p, g, exp_avg, exp_avg_sq (16) and writes p, exp_avg, exp_avg_sq (12).
ADAMW = 28
#: ``torch._foreach_*`` Fromage: norms of p and g (8); p *= s (8); t = g * c (8); p += t (12).
FOREACH = 36
#: The per-tensor loop users run: norms of g and p (8); t = g * ratio (8); p -= lr * t (12); p /= k (8).
LOOP = 36
#: The reference backend: (p*p).sum() and (g*g).sum() each write and reread a temporary (24);
#: then t = a*g (8), u = p - t (12), v = s*u (8), p.copy_(v) (8).
REFERENCE = 60
#: GradScaler's inf/NaN check of the gradients before an AMP step reads g once more.
AMP_CHECK = 4
#: With p_bound, <p, g> as a separate product and sum costs this much more in the two torch paths.
INNER_PRODUCT = 16
#: The per-tensor loop measures the updated norm once more with p_bound.
LOOP_BOUND_NORM = 4


def scaled(bytes_fp32: float, dtype: torch.dtype) -> float:
    """``bytes_fp32`` for tensors of ``dtype`` (bf16 moves half the bytes of fp32)."""
    return bytes_fp32 * torch.empty((), dtype=dtype).element_size() / 4


def gbps(n_params: int, bytes_per_param: float, seconds: Optional[float]) -> Optional[float]:
    """Effective bandwidth in GB/s (1e9 bytes) of moving ``bytes_per_param`` per parameter in ``seconds``."""
    if seconds is None or seconds <= 0:
        return None
    return n_params * bytes_per_param / seconds / 1e9


def copy_gbps(nbytes: int, seconds: float) -> float:
    """Bandwidth of ``dst.copy_(src)`` of ``nbytes``: it reads them and writes them."""
    return 2 * nbytes / seconds / 1e9


def fraction(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or not reference:
        return None
    return value / reference


def speedup(baseline_seconds: Optional[float], seconds: Optional[float]) -> Optional[float]:
    """How many times faster than the baseline (> 1: faster, < 1: slower)."""
    if baseline_seconds is None or seconds is None or seconds <= 0:
        return None
    return baseline_seconds / seconds

# The layer-wise optimizers (docs/lars_lamb_semantics.md counts the fused passes).
#: LARS with momentum, fused: stats read p, g (8); apply reads p, g, buf and writes p, buf (20).
LARS_MOMENTUM = 28
#: LAMB with global clipping, fused: the global norm reads g (4); moments read g, p, m, v and
#: write m, v (24); apply reads m, v, p and writes p (16).
LAMB_CLIPPED = 44
#: timm's Lars per tensor (CPU path, adapting, momentum): two norms (8), d = g + wd·p (12),
#: d *= r (8), buf *= μ (8), buf += d (12), p -= lr·buf (12).
TIMM_LARS = 60
#: timm's Lamb per tensor (CPU path, defaults): the global norm (4), g / c (8), m lerp (12),
#: v *= β2 (8), v += (1-β2)·g² (12), √v (8), / √bc2 (8), + eps (8), m / bc1 (8), / denom (12),
#: + wd·p (12), two norms (8), u *= r (8), p -= lr·u (12).
TIMM_LAMB = 128
#: apex's FusedLAMB: global norm (4), ‖p‖ (4), stage 1 reads g, p, m, v and writes the update
#: into g, m, v (28), the update's norm (4), stage 2 reads it and p and writes p (12).
APEX_LAMB = 52
