"""Per-layer monitoring from the stats a step computes anyway.

With ``Fromage(..., monitor=True)`` (or ``opt.monitor = True``) a step keeps, for each of its
groups, the ``[n, 3]`` stats (``||p||^2``, ``||g||^2``, ``<p, g>`` before the update, of the whole
tensors for DTensor shards), the lr it used and the loss-scaling flags: references, no extra pass
over the tensors. :meth:`Fromage.last_stats` turns them into per-parameter device tensors on
request, with a few vector ops per group and no host synchronisation.

Cost when on: the stats phase also computes ``<p, g>`` (free in the fused kernels, which read
``p`` and ``g`` anyway; two more foreach passes in ``foreach``) and, per group and step, a copy of
a tensor lr and of GradScaler's scale (a schedule or ``scaler.update()`` changes them in place
afterwards). When off: nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ._math import coefficients, usable_lr

__all__ = ["StepStats", "Record", "summarize"]


@dataclass
class StepStats:
    """One group's parameters after a step, as 1-D tensors on the group's device (one entry per
    parameter, in ``params`` order). Norms and the cosine are of the tensors before the update;
    ``g_norm`` is of the unscaled gradient (GradScaler's scale divided out); ``cos`` is
    ``<p, g> / (||p|| ||g||)`` of the gradient as given (NaN for a zero tensor);
    ``relative_change`` is ``||p_new - p|| / ||p||`` of this step (0 for a step skipped by
    ``found_inf`` and for a tensor that did not move; inf for a zero tensor that moved); ``clamped`` says whether the ``p_bound``
    clamp scaled the update down (always False without ``p_bound``)."""

    params: List[torch.Tensor]
    p_norm: torch.Tensor
    g_norm: torch.Tensor
    cos: torch.Tensor
    relative_change: torch.Tensor
    clamped: torch.Tensor

    def per_parameter(self) -> Dict[torch.Tensor, Dict[str, torch.Tensor]]:
        """``{parameter: {"p_norm": 0-d tensor, ...}}`` (views of the 1-D tensors)."""
        names = ("p_norm", "g_norm", "cos", "relative_change", "clamped")
        columns = [getattr(self, name).unbind() for name in names]
        return {p: dict(zip(names, values)) for p, values in zip(self.params, zip(*columns))}


@dataclass
class Record:
    """What a step keeps of one group for :func:`summarize`."""

    params: List[torch.Tensor]
    stats: torch.Tensor
    lr: torch.Tensor
    max_norms: Optional[List[torch.Tensor]]
    p_bound: Optional[float]
    maximize: bool
    prefactor: bool
    found_inf: Optional[torch.Tensor]
    grad_scale: Optional[torch.Tensor]


def _kept(t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(device=device, dtype=torch.float32).reshape(()).clone()


def record(group, stats: torch.Tensor, lr: torch.Tensor, found_inf, grad_scale) -> Record:
    device = stats.device
    return Record(list(group.sources), stats, lr.clone(), group.max_norms, group.p_bound, group.maximize,
                  group.prefactor, _kept(found_inf, device), _kept(grad_scale, device))


def summarize(rec: Record) -> StepStats:
    stats = rec.stats
    s_pp, s_gg, s_pg = stats.unbind(1)
    scale = None if rec.grad_scale is None else rec.grad_scale.to(stats.dtype)
    # the max_norm the step used: set by it if it was unset (a skipped step left it unset)
    max_norm = torch.stack(list(rec.max_norms)) if rec.p_bound is not None else None
    cp, cg, used = coefficients(stats, rec.lr, max_norm=max_norm, p_bound=rec.p_bound, maximize=rec.maximize,
                                prefactor=rec.prefactor, grad_scale=rec.grad_scale)
    p_norm = s_pp.sqrt()
    g_raw = s_gg.sqrt()
    g_norm = g_raw if scale is None else g_raw / scale
    cos = s_pg / (p_norm * g_raw)
    delta_sq = ((cp - 1) ** 2 * s_pp + 2 * (cp - 1) * cg * s_pg + cg * cg * s_gg).clamp(min=0)
    relative = torch.where(delta_sq > 0, delta_sq.sqrt() / p_norm, torch.zeros_like(p_norm))
    if rec.p_bound is not None:
        # The same coefficients without the bound: the clamp acted where it made c_p smaller
        # (computed by the same operations, so no rounding difference can flag a tensor it missed).
        free, _, _ = coefficients(stats, rec.lr, maximize=rec.maximize, prefactor=rec.prefactor,
                                  grad_scale=rec.grad_scale)
        clamped = cp < free
    else:
        clamped = torch.zeros_like(p_norm, dtype=torch.bool)
    # a step skipped (found_inf, an unusable lr) changed nothing
    applied = usable_lr(rec.lr)
    if rec.found_inf is not None:
        applied = applied & (rec.found_inf == 0)
    relative = torch.where(applied, relative, torch.zeros_like(relative))
    clamped = clamped & applied
    return StepStats(rec.params, p_norm, g_norm, cos, relative, clamped)
