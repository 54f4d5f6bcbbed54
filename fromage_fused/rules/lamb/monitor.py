"""LAMB's per-layer monitoring: ``LAMB.last_stats()`` from the step's own sums.

Cost when on: the global-norm pass runs without ``max_grad_norm`` too (it reads g: 4 B per fp32
parameter), with a decoupled decay the moments pass sums ⟨u, p⟩ too (no more bytes), and per group
and step a copy of the packed hyper-parameters and of GradScaler's scale. When off: nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from ...engine.spec import usable_lr
from .flags import ADAPT, CAUTION, CORRECTED_WEIGHT_DECAY, DECOUPLED_DECAY, NORMS, TRUST_CLIP
from .passes import AA, AGREE, AP, ELEMENTS, PP
from .reference import CAUTION_FLOOR

__all__ = ["LambStats", "summarize"]

NAMES = ("g_norm", "p_norm", "update_norm", "trust_ratio", "relative_change")


@dataclass
class LambStats:
    """One group's parameters after a step, as 1-D tensors on the group's device (one entry per
    parameter, in ``params`` order):

    - ``g_norm``: ‖g‖ of the gradient as given, the loss scale divided out (before clipping);
    - ``p_norm``: ‖p‖ before the update (after a decoupled decay), where the group adapts;
    - ``update_norm``: ‖u‖ of the update the trust ratio scales (caution's mask and rescaling and a
      coupled decay included), where the group adapts or is cautious;
    - ``trust_ratio``: the ratio the step used (1 in a group that does not adapt);
    - ``relative_change``: ‖p_new − p‖ / ‖p‖ of this step (‖p‖ before it, a decoupled decay's
      shrink included in the change), where the group adapts (0 for a step that ``found_inf`` or
      an unusable lr skipped).

    NaN where a value is not one the step measured (a group that runs as Adam reads no ‖p‖)."""

    params: List[torch.Tensor]
    g_norm: torch.Tensor
    p_norm: torch.Tensor
    update_norm: torch.Tensor
    trust_ratio: torch.Tensor
    relative_change: torch.Tensor

    def per_parameter(self) -> Dict[torch.Tensor, Dict[str, torch.Tensor]]:
        """``{parameter: {"g_norm": 0-d tensor, ...}}`` (views of the 1-D tensors)."""
        columns = [getattr(self, name).unbind() for name in NAMES]
        return {p: dict(zip(NAMES, values)) for p, values in zip(self.params, zip(*columns))}


def summarize(rec) -> LambStats:
    """From an ``engine.monitor.Record`` of a LAMB step (its flags computed with ``monitor``)."""
    values = rec.values
    flags = rec.rule.flags(values, True)
    grad_sums, sums = rec.sums[0], rec.sums[1]
    acc = sums.dtype
    nan = torch.full_like(sums[:, 0], float("nan"))
    one = torch.ones_like(nan)
    g_norm = grad_sums[:, 0].sqrt()
    lr = rec.hyper[0].to(acc)
    applied = usable_lr(lr)
    if rec.found_inf is not None:
        applied = applied & (rec.found_inf == 0)
    if not flags & NORMS:
        return LambStats(rec.params, g_norm, nan, nan, one, nan)
    wd = float(values["weight_decay"])
    decoupled = bool(flags & DECOUPLED_DECAY) and wd != 0
    coupled = 0.0 if decoupled else wd
    share = one
    if flags & CAUTION:
        elements = sums[:, ELEMENTS]
        share = torch.where(elements > 0, torch.clamp(sums[:, AGREE] / elements, min=CAUTION_FLOOR), one)
        u_sq = sums[:, AA] / (share * share) + 2 * coupled * sums[:, AP] / share + coupled * coupled * sums[:, PP]
        update_norm = u_sq.clamp(min=0.0).sqrt()
    else:
        update_norm = sums[:, AA].sqrt()
    if not flags & ADAPT:
        return LambStats(rec.params, g_norm, nan, update_norm, one, nan)
    before = sums[:, PP].sqrt()
    p_norm = before
    decay = 0.0
    if decoupled:
        shrink = lr * lr / float(values["max_lr_snapshot"]) if flags & CORRECTED_WEIGHT_DECAY else lr
        decay = shrink * wd
        p_norm = p_norm * (1 - decay).abs()
    ratio = torch.where((p_norm > 0) & (update_norm > 0), p_norm / update_norm, one)
    if flags & TRUST_CLIP:
        ratio = ratio.clamp(max=1.0)
    step = lr * ratio
    if decoupled:
        # Δp = −(decay·p + step·u): ‖Δp‖² = decay²‖p‖² + 2·decay·step·⟨u, p⟩ + step²‖u‖²
        # (the moments pass sums ⟨a, p⟩ for the monitor; u = a / share)
        moved_sq = decay * decay * sums[:, PP] + 2 * decay * step * sums[:, AP] / share + \
            step * step * update_norm * update_norm
        moved = moved_sq.clamp(min=0.0).sqrt()
    else:
        moved = step * update_norm
    relative = torch.where(applied & (moved > 0), moved / before, torch.zeros_like(moved))
    return LambStats(rec.params, g_norm, p_norm, update_norm, ratio, relative)
