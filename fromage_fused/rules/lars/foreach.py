"""LARS on the foreach backend: ``torch._foreach_*`` over a group, every scalar kept on the device.

No tensor value is read on the host: the trust ratio, the first-step selection of the buffer and
the ``found_inf`` / unusable-lr skip are tensor ops; the Python branches read only the flags, which
the rule derives from the group's Python values. Per tensor the step is

    d   = round(c_g·g) + round(c_p·p)        c_g = r / grad_scale, c_p = r·weight_decay
    buf = round(a·buf) + round(b·d)          a = momentum, b = 1 - dampening once started; else a = 0, b = 1
    u   = d + round(momentum·buf) if nesterov, else buf
    p   = p - round(lr·u)

in the accumulation dtype (bf16/fp16 parameters are upcast and rounded once), each product and sum
rounded on its own (no ``addcmul``, which torch may fuse). Tensors go in runs of whole tensors whose
temporaries stay within the backend's budget (``backends/foreach.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...backends import foreach as _fe
from ...engine.dtypes import LOW_PRECISION, accumulate_dtype
from ...engine.rounding import stochastic_round_bf16
from ...engine.spec import usable_lr
from . import passes
from .flags import ADAPT, MOMENTUM, MONITOR, NESTEROV, TRUST_CLIP

# the packed hyper-parameters' slots (the spec's order: LARS_RULE.spec.slots)
LR, MU, DAMPENING, WD, TRUST_COEFF, EPS = range(6)


def stats(params, grads, flags: int) -> torch.Tensor:
    """``[n, 2]``: ``‖p‖², ‖g‖²`` (raw gradient); run only when adapting (the pass's ``when``)."""
    dtype = params[0].dtype
    acc = accumulate_dtype(dtype)
    n = len(params)
    # On CPU, norms over pieces combined as a tree (torch's norm of one long tensor drifts with length).
    p_norms, g_norms, owner = [], [], []
    for run in _fe.runs(params, grads, 4 if dtype in LOW_PRECISION else 0, piece=_fe.norm_piece(params)):
        p_norms += torch._foreach_norm(run.params, 2, dtype=acc)
        g_norms += torch._foreach_norm(run.grads, 2, dtype=acc)
        owner += run.owner
    return torch.stack([_fe.combine(torch.stack(p_norms).square(), owner, n),
                        _fe.combine(torch.stack(g_norms).square(), owner, n)], dim=1)


def coefficients(sums, hyper, flags: int, grad_scale):
    """``(c_g, c_p)``, ``[n]`` each: ``d = c_g·g + c_p·p`` (``c_p`` is None without weight decay's term)."""
    acc = sums.dtype
    one = torch.ones((), dtype=acc, device=sums.device)
    scale = one if grad_scale is None else grad_scale.to(acc)
    if not flags & ADAPT:
        return (one / scale).expand(sums.shape[0]), None
    lr, wd = hyper[LR], hyper[WD]
    p_norm, g_norm = sums.sqrt().unbind(1)
    g_norm = g_norm / scale
    both = (p_norm > 0) & (g_norm > 0)
    ratio = torch.where(both, hyper[TRUST_COEFF] * p_norm / (g_norm + wd * p_norm + hyper[EPS]), one)
    if flags & TRUST_CLIP:
        ratio = torch.minimum(ratio / lr, one)  # lr = 0: +inf, so 1
    return ratio / scale, ratio * wd


def apply(params, bufs, grads, sums, *, hyper, values, flags, started, found_inf=None, grad_scale=None,
          sr_seed=None) -> Optional[torch.Tensor]:
    acc = sums.dtype
    low = params[0].dtype != acc
    c_g, c_p = coefficients(sums, hyper, flags, grad_scale)
    if values["weight_decay"] == 0:
        c_p = None  # (adapting only through always_adapt: no decay term to add)
    # A skip (found_inf, or a tensor lr edited to an unusable value) selects the old values of
    # everything written; a Python-number lr was checked when the plan read it.
    keep = None
    if isinstance(values["lr"], torch.Tensor):
        keep = usable_lr(hyper[LR])
    if found_inf is not None:
        keep = (found_inf == 0) if keep is None else keep & (found_inf == 0)
    momentum = bool(flags & MOMENTUM)
    columns = [c_g] + ([c_p] if c_p is not None else [])
    if momentum:
        on = started > 0
        columns += [torch.where(on, hyper[MU], 0.0), torch.where(on, 1 - hyper[DAMPENING], 1.0)]
    views = _fe.column_views(torch.stack([c.to(acc) for c in columns], dim=1))
    vg, vp = views[0], (views[1] if c_p is not None else None)
    va, vb = (views[-2], views[-1]) if momentum else (None, None)
    width = torch.empty((), dtype=acc).element_size()
    whole = len(params)
    # Whether the update goes to copies first (upcast, or kept only where the step is applied). A
    # flag, not ``work is not run.params``: dynamo in torch 2.6 traces ``is`` between two lists as
    # a comparison of their elements, which on tensors breaks the graph.
    copied = low or keep is not None
    moved, owner = [], []  # monitoring: ‖u‖ per tensor of the runs (whole tensors)
    for run in _fe.runs(params, grads, 5 * width, split=False):
        def pick(v, owner=run.owner):
            return v if len(owner) == whole else [v[i] for i in owner]

        # d: the gradient's product first (a gradient may share its parameter's memory)
        d = [g.to(acc, copy=True) for g in run.grads] if low else torch._foreach_mul(run.grads, pick(vg))
        if low:
            torch._foreach_mul_(d, pick(vg))
        work = [p.to(acc, copy=True) for p in run.params] if copied else run.params
        if vp is not None:
            torch._foreach_add_(d, torch._foreach_mul(work, pick(vp)))
        u = d
        if momentum:
            run_bufs = [bufs[i] for i in run.owner]
            new_bufs = torch._foreach_mul(run_bufs, pick(va))
            torch._foreach_add_(new_bufs, torch._foreach_mul(d, pick(vb)))
            if flags & NESTEROV:
                torch._foreach_add_(d, torch._foreach_mul(new_bufs, hyper[MU]))
            else:
                u = new_bufs
            _fe.write_kept(run_bufs, new_bufs, keep)
        if flags & MONITOR:
            moved += torch._foreach_norm(u, 2, dtype=acc)
            owner += run.owner
        torch._foreach_sub_(work, torch._foreach_mul(u, hyper[LR]))
        if copied:
            if sr_seed is not None:  # (bf16 groups that round stochastically: whole tensors here)
                work = [stochastic_round_bf16(w, sr_seed, i) for w, i in zip(work, run.owner)]
            _fe.write_kept(run.params, work, keep)
        del d, u, work
    if not flags & MONITOR:
        return None
    return _fe.combine(torch.stack(moved).square(), owner, whole).unsqueeze(1)


class Foreach:
    """The passes for ``backends/foreach.py``."""

    @staticmethod
    def run_pass(index: int, call):
        return passes.run_pass(index, call, stats, apply)
