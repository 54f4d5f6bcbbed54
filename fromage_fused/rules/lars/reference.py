"""LARS on the reference backend: a per-tensor loop that reads the step's scalars on the host.

The test oracle's twin inside the engine (run on float64 copies): every decision is a Python ``if``
on a number, written to be read against the rule (``rule.py``). The update is computed in the
accumulation dtype (float64 for float64 tensors, else float32) and rounded once into ``p``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...engine.dtypes import accumulate_dtype
from ...engine.rounding import stochastic_round_bf16
from ...engine.spec import FLOAT32_MAX
from . import passes
from .flags import ADAPT, MOMENTUM, MONITOR, NESTEROV, TRUST_CLIP


def stats(params, grads, flags: int) -> torch.Tensor:
    """``[n, 2]``: ``‖p‖², ‖g‖²`` of the raw (loss-scaled) gradient (run only when adapting)."""
    acc = accumulate_dtype(params[0].dtype)
    rows = [torch.stack([p.to(acc).square().sum(), g.to(acc).square().sum()]) for p, g in zip(params, grads)]
    return torch.stack(rows)


def trust_ratio(s_pp: float, s_gg: float, *, lr: float, weight_decay: float, trust_coeff: float, eps: float,
                trust_clip: bool, scale: float) -> float:
    p_norm, g_norm = math.sqrt(s_pp), math.sqrt(s_gg) / scale  # ‖g / grad_scale‖
    r = trust_coeff * p_norm / (g_norm + weight_decay * p_norm + eps) if p_norm > 0 and g_norm > 0 else 1.0
    if trust_clip:
        # min(r / lr, 1); lr = 0 divides to +inf, so 1 (the step is zero either way)
        r = 1.0 if lr == 0 else min(r / lr, 1.0)
    return r


def apply(params, bufs, grads, sums, *, hyper, values, flags, started, found_inf=None, grad_scale=None,
          sr_seed=None) -> Optional[torch.Tensor]:
    moved = torch.zeros(len(params), 1, dtype=accumulate_dtype(params[0].dtype), device=params[0].device) \
        if flags & MONITOR else None
    if found_inf is not None and float(found_inf) != 0:
        return moved
    lr = float(hyper[0])
    if not 0 <= lr <= FLOAT32_MAX:  # a tensor lr edited to an unusable value: skipped (spec.usable_lr)
        return moved
    scale = 1.0 if grad_scale is None else float(grad_scale)
    wd, mu, damp = float(values["weight_decay"]), float(values["momentum"]), float(values["dampening"])
    for i, (p, g) in enumerate(zip(params, grads)):
        acc = accumulate_dtype(p.dtype)
        p_, d = p.to(acc), g.to(acc) / scale
        if flags & ADAPT:
            s_pp, s_gg = (float(x) for x in sums[i])
            r = trust_ratio(s_pp, s_gg, lr=lr, weight_decay=wd, trust_coeff=float(values["trust_coeff"]),
                            eps=float(values["eps"]), trust_clip=bool(flags & TRUST_CLIP), scale=scale)
            d = (d + wd * p_) * r
        if flags & MOMENTUM:
            buf = bufs[i]
            if float(started[i]) == 0:
                buf.copy_(d)
            else:
                buf.copy_(mu * buf + (1 - damp) * d)
            d = d + mu * buf if flags & NESTEROV else buf
        if moved is not None:
            moved[i, 0] = d.square().sum()
        new = p_ - lr * d
        p.copy_(new if sr_seed is None else stochastic_round_bf16(new, sr_seed, i))
    return moved


class Reference:
    """The passes for ``backends/reference.py``."""

    @staticmethod
    def run_pass(index: int, call):
        return passes.run_pass(index, call, stats, apply)
