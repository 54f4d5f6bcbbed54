"""LARS's per-layer monitoring: ``LARS.last_stats()`` from the step's own norms.

Cost when on: the norms pass runs in groups that do not adapt too (it reads p and g: 8 B per fp32
parameter more there), the update pass sums ‖u‖² of its step (no more bytes; on sharded parameters
one more all-reduce of one number per tensor), and per group and step a copy of the packed
hyper-parameters and of GradScaler's scale. When off: nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from ...engine.spec import usable_lr
from .flags import ADAPT
from .foreach import LR, coefficients

__all__ = ["LarsStats", "summarize"]


@dataclass
class LarsStats:
    """One group's parameters after a step, as 1-D tensors on the group's device (one entry per
    parameter, in ``params`` order): ``p_norm`` (‖p‖ before the update), ``g_norm`` (‖g‖, the loss
    scale divided out), ``trust_ratio`` (the ratio the step scaled the direction by: 1 in a group
    that does not adapt, and where either norm is 0), ``local_lr`` (lr × trust_ratio: the
    tensor's own learning rate; 0 for a step that ``found_inf`` or an unusable lr skipped) and
    ``relative_change`` (‖p_new − p‖ / ‖p‖ of the step, momentum and weight decay included: lr·‖u‖
    of ``p ← p − lr·u`` over ‖p‖ before it; 0 for a skipped step, inf for a zero p that moved)."""

    params: List[torch.Tensor]
    p_norm: torch.Tensor
    g_norm: torch.Tensor
    trust_ratio: torch.Tensor
    local_lr: torch.Tensor
    relative_change: torch.Tensor

    def per_parameter(self) -> Dict[torch.Tensor, Dict[str, torch.Tensor]]:
        """``{parameter: {"p_norm": 0-d tensor, ...}}`` (views of the 1-D tensors)."""
        names = ("p_norm", "g_norm", "trust_ratio", "local_lr", "relative_change")
        columns = [getattr(self, name).unbind() for name in names]
        return {p: dict(zip(names, values)) for p, values in zip(self.params, zip(*columns))}


def summarize(rec) -> LarsStats:
    """From an ``engine.monitor.Record`` of a LARS step (its flags computed with ``monitor``)."""
    sums = rec.sums[0]  # in the group's accumulation dtype (float64 for float64 tensors)
    flags = rec.rule.flags(rec.values, True)
    hyper = rec.hyper.to(sums.dtype)
    lr = hyper[LR]
    scale = None if rec.grad_scale is None else rec.grad_scale.to(sums.dtype)
    p_norm, g_raw = sums.sqrt().unbind(1)
    g_norm = g_raw if scale is None else g_raw / scale
    c_g, _ = coefficients(sums, hyper, flags, scale)
    ratio = c_g if scale is None else c_g * scale
    if not flags & ADAPT:
        ratio = torch.ones_like(p_norm)
    applied = usable_lr(lr)
    if rec.found_inf is not None:
        applied = applied & (rec.found_inf == 0)
    zero = torch.zeros_like(ratio)
    local = torch.where(applied, lr * ratio, zero)
    moved = lr * rec.sums[1][:, 0].sqrt()
    relative = torch.where(applied & (moved > 0), moved / p_norm, zero)
    return LarsStats(rec.params, p_norm, g_norm, ratio, local, relative)
