"""Fromage on the reference backend: a per-tensor loop that reads the step's scalars on the host.

It is the test oracle (run on float64 copies) and the only backend allowed to synchronise. It
keeps the two passes so that it also serves sharded tensors, but every decision is a Python ``if``
on a number, written to be read against the rule (``rule.py``).
"""
from __future__ import annotations

import math

import torch

from ...engine.dtypes import accumulate_dtype
from ...engine.rounding import stochastic_round_bf16
from .coefficients import FLOAT32_MAX
from . import passes


def stats(params, grads, inner: bool) -> torch.Tensor:
    rows = []
    for p, g in zip(params, grads):
        acc = accumulate_dtype(p.dtype)
        p_, g_ = p.to(acc), g.to(acc)
        pg = (p_ * g_).sum() if inner else torch.zeros((), dtype=acc, device=p.device)
        rows.append(torch.stack([(p_ * p_).sum(), (g_ * g_).sum(), pg]))
    return torch.stack(rows)


def apply(params, grads, stats, *, lr, max_norm, p_bound, maximize, prefactor=True, found_inf=None, grad_scale=None,
          sr_seed=None) -> None:
    if found_inf is not None and float(found_inf) != 0:
        return
    lr = float(lr)
    if not 0 <= lr <= FLOAT32_MAX:  # (NaN too) skipped, as found_inf (coefficients.usable_lr)
        return
    scale = 1.0 if grad_scale is None else float(grad_scale)
    s = 1.0 / math.sqrt(1.0 + lr * lr) if prefactor else 1.0
    for i, (p, g) in enumerate(zip(params, grads)):
        s_pp, s_gg, s_pg = (float(x) for x in stats[i])
        if s_pp > 0 and s_gg > 0:
            a = lr * math.sqrt(s_pp) / math.sqrt(s_gg)
        else:
            a = lr / scale
        if maximize:
            a = -a
        factor = s
        if p_bound is not None:
            bound = float(max_norm[i])
            if bound < 0:  # unset (see coefficients.UNSET_MAX_NORM)
                max_norm[i] = p_bound * math.sqrt(s_pp)
                bound = float(max_norm[i])  # the float32 state, as every later step sees it
            new_norm = s * math.sqrt(max(s_pp - 2 * a * s_pg + a * a * s_gg, 0.0))
            if new_norm > bound:
                factor = s * bound / new_norm
        acc = accumulate_dtype(p.dtype)
        new = factor * (p.to(acc) - a * g.to(acc))
        if sr_seed is not None and p.dtype == torch.bfloat16:
            new = stochastic_round_bf16(new, sr_seed, i)
        p.copy_(new)


class Reference:
    """The passes for ``backends/reference.py``."""

    @staticmethod
    def run_pass(index: int, call):
        return passes.run_pass(index, call, stats, apply)
