"""LAMB on the reference backend: a per-tensor loop that reads the step's scalars on the host.

The test oracle's twin inside the engine (run on float64 copies): every decision is a Python ``if``
on a number, written to be read against the rule (``rule.py``). The update is computed in the
accumulation dtype (float64 for float64 tensors, else float32; the moments are of that dtype) and
rounded once into ``p``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...engine.dtypes import accumulate_dtype
from ...engine.rounding import stochastic_round_bf16
from ...engine.spec import FLOAT32_MAX
from . import passes
from .flags import ADAPT, BIAS_CORRECTION, CAUTION, CLIP, CORRECTED_WEIGHT_DECAY, DECOUPLED_DECAY, GRAD_AVERAGING, \
    TRUST_CLIP
from .passes import AA, AGREE, AP, ELEMENTS, PP, sums_inner

#: The floor of the fraction of agreeing signs that rescales a cautious update (timm's).
CAUTION_FLOOR = 1e-3


class _Step:
    """The step's numbers for one group, on the host."""

    def __init__(self, call):
        values, flags = call.values, call.flags
        self.flags = flags
        self.acc = accumulate_dtype(call.dtype)
        self.lr = float(call.hyper[0])
        self.scale = 1.0 if call.grad_scale is None else float(call.grad_scale)
        self.clip = float(call.globals) if flags & CLIP else None
        self.b1, self.b2 = (float(b) for b in values["betas"])
        self.into_m = 1 - self.b1 if flags & GRAD_AVERAGING else 1.0
        t = float(call.counters["step"]) + 1  # the count after this step
        self.c1 = 1 - self.b1 ** t if flags & BIAS_CORRECTION else 1.0
        self.c2 = 1 - self.b2 ** t if flags & BIAS_CORRECTION else 1.0
        self.eps = float(values["eps"])
        wd = float(values["weight_decay"])
        decoupled = bool(flags & DECOUPLED_DECAY) and wd != 0
        self.coupled = 0.0 if decoupled else wd  # the decay term inside u
        shrink = self.lr * self.lr / float(values["max_lr_snapshot"]) if flags & CORRECTED_WEIGHT_DECAY else self.lr
        self.decay = shrink * wd if decoupled else None  # p <- p - decay·p

    def grad(self, g):
        g = g.to(self.acc) / self.scale
        return g if self.clip is None else g / self.clip

    def moments(self, m, v, g):
        m.copy_(self.b1 * m + self.into_m * g)
        v.copy_(self.b2 * v + (1 - self.b2) * g * g)

    def update(self, m, v):
        return (m / self.c1) / (v.sqrt() / math.sqrt(self.c2) + self.eps)


def _skipped(call) -> Optional[_Step]:
    """The step's numbers, or None when it changes nothing (found_inf, or a tensor lr edited to an
    unusable value: spec.usable_lr)."""
    if call.found_inf is not None and float(call.found_inf) != 0:
        return None
    if not 0 <= float(call.hyper[0]) <= FLOAT32_MAX:
        return None
    return _Step(call)


def grad_norm(grads, call) -> torch.Tensor:
    """``[n, 1]``: ‖g / grad_scale‖² (only with ``max_grad_norm``: the pass's ``when``)."""
    acc = accumulate_dtype(call.dtype)
    scale = 1.0 if call.grad_scale is None else float(call.grad_scale)
    return torch.stack([(g.to(acc) / scale).square().sum() for g in grads]).reshape(-1, 1)


def _mask(u, g):
    return (u * g > 0).to(u.dtype)


def moments(exp_avgs, exp_avg_sqs, params, grads, call) -> torch.Tensor:
    acc = accumulate_dtype(call.dtype)
    sums = torch.zeros(len(grads), 5, dtype=acc, device=call.device)
    s = _skipped(call)
    if s is None:
        return sums  # (apply skips too)
    caution = bool(call.flags & CAUTION)
    inner = params is not None and sums_inner(call.flags, s.coupled)
    for i, (m, v, g) in enumerate(zip(exp_avgs, exp_avg_sqs, grads)):
        g = s.grad(g)
        s.moments(m, v, g)
        a = s.update(m, v)
        p = None if params is None else params[i].to(acc)
        if caution:
            k = _mask(a, g)
            a = a * k
            sums[i, AGREE], sums[i, ELEMENTS] = k.sum(), k.numel()
        elif s.coupled != 0:
            a = a + s.coupled * p
        if inner:
            sums[i, AP] = (a * p).sum()
        if p is not None:
            sums[i, PP] = p.square().sum()
        sums[i, AA] = a.square().sum()
    return sums


def trust_ratio(row, s: _Step) -> float:
    """‖p‖ / ‖u‖ from one tensor's sums (1 if either is 0), ‖p‖ after a decoupled decay."""
    s_pp, s_aa, s_ap, agree, elements = (float(x) for x in row)
    p_norm = math.sqrt(s_pp) * (1.0 if s.decay is None else abs(1 - s.decay))
    if s.flags & CAUTION:
        share = max(agree / elements, CAUTION_FLOOR) if elements else 1.0
        u_norm = math.sqrt(max(s_aa / share ** 2 + 2 * s.coupled * s_ap / share + s.coupled ** 2 * s_pp, 0.0))
    else:
        u_norm = math.sqrt(s_aa)
    r = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
    return min(r, 1.0) if s.flags & TRUST_CLIP else r


def apply(params, exp_avgs, exp_avg_sqs, grads, call) -> None:
    s = _skipped(call)
    if s is None:
        return
    for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
        p_, u = p.to(s.acc), s.update(m, v)
        if s.flags & CAUTION:
            agree, elements = float(call.sums[i, AGREE]), float(call.sums[i, ELEMENTS])
            share = max(agree / elements, CAUTION_FLOOR) if elements else 1.0
            u = u * _mask(u, s.grad(grads[i])) / share
        if s.coupled != 0:
            u = u + s.coupled * p_
        if s.decay is not None:
            p_ = p_ - s.decay * p_
        if s.flags & ADAPT:
            u = u * trust_ratio(call.sums[i], s)
        p.copy_(_rounded(p_ - s.lr * u, call.seed, i))


def adam(params, exp_avgs, exp_avg_sqs, grads, call) -> None:
    """Neither adapting nor cautious (so no weight decay): Adam with the clipped gradient."""
    s = _skipped(call)
    if s is None:
        return
    for i, (p, m, v, g) in enumerate(zip(params, exp_avgs, exp_avg_sqs, grads)):
        s.moments(m, v, s.grad(g))
        p.copy_(_rounded(p.to(s.acc) - s.lr * s.update(m, v), call.seed, i))


def _rounded(new, seed, index):
    """``new`` rounded stochastically to bf16 where the group asks for it (``seed`` is None otherwise)."""
    return new if seed is None else stochastic_round_bf16(new, seed, index)


class Reference:
    """The passes for ``backends/reference.py``."""

    @staticmethod
    def run_pass(index: int, call):
        return passes.run_pass(index, call, grad_norm, moments, apply, adam)
