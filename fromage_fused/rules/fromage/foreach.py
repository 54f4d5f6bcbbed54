"""Fromage on the foreach backend: ``torch._foreach_*`` over a group, every scalar kept on the device.

``<p, g>`` comes from two ``_foreach_norm(ord=1)`` passes over the products (``sum(x) =
2 sum(max(x, 0)) - sum(|x|)``), not from a ``.sum()`` per tensor. The update is
``p <- round(round(c_p p) + round(c_g g))``, a product and a sum each rounded on its own, as in
every backend (docs/backends.md, "Bit-identical results"): never ``addcmul``, which torch may compute with a
fused multiply-add. Temporaries are bounded by the backend's pieces (``backends/foreach.py``).
"""
from __future__ import annotations

import torch

from ...backends import foreach as _fe
from ...engine.dtypes import LOW_PRECISION, accumulate_dtype
from ...engine.rounding import stochastic_round_bf16
from .coefficients import coefficients, usable_lr
from . import passes


def stats(params, grads, inner: bool) -> torch.Tensor:
    dtype = params[0].dtype
    acc = accumulate_dtype(dtype)
    low = dtype in LOW_PRECISION
    n = len(params)
    # Norms in the accumulation dtype; on CPU a bf16/fp16 norm upcasts each tensor inside the
    # op, one at a time, so large ones go in slices.
    piece = _fe.norm_piece(params)
    p_norms, g_norms, owner = [], [], []
    for run in _fe.runs(params, grads, 4 if low else 0, piece=piece):
        p_norms += torch._foreach_norm(run.params, 2, dtype=acc)
        g_norms += torch._foreach_norm(run.grads, 2, dtype=acc)
        owner += run.owner
    columns = [_fe.combine(torch.stack(p_norms).square(), owner, n),
               _fe.combine(torch.stack(g_norms).square(), owner, n)]
    if inner:
        columns.append(_inner(params, grads, acc, low, n, piece))
    else:
        columns.append(torch.zeros(n, dtype=acc, device=params[0].device))
    return torch.stack(columns, dim=1)


def _inner(params, grads, acc, low, n, piece) -> torch.Tensor:
    """``<p, g>`` per tensor: sum(x) = 2 sum(max(x, 0)) - sum(|x|) over the products x, with
    two L1 norms (an absolute error of a few ulps of ||p|| ||g||, which is what the clamp reads)."""
    totals, positives, owner = [], [], []
    for run in _fe.runs(params, grads, 8 if low else 4, piece=piece):
        if low:  # products of bf16/fp16 values are exact in fp32
            prods = [p.to(acc) for p in run.params]
            torch._foreach_mul_(prods, run.grads)
        else:
            prods = torch._foreach_mul(run.params, run.grads)
        totals += torch._foreach_norm(prods, 1, dtype=acc)
        torch._foreach_clamp_min_(prods, 0.0)
        positives += torch._foreach_norm(prods, 1, dtype=acc)
        del prods
        owner += run.owner
    return _fe.combine(2 * torch.stack(positives) - torch.stack(totals), owner, n)


def apply(params, grads, stats, *, lr, max_norm, p_bound, maximize, prefactor=True, found_inf=None, grad_scale=None,
          sr_seed=None) -> None:
    old_max = max_norm if p_bound is not None else None
    coef_p, coef_g, new_max = coefficients(
        stats, lr, max_norm=old_max, p_bound=p_bound, maximize=maximize, prefactor=prefactor, grad_scale=grad_scale
    )
    # An unusable lr skips the step: with found_inf, through its exact selection; without
    # it, through the coefficients (1, 0), which keep every finite value (a -0 may become +0;
    # a non-finite gradient turns its parameter into NaN, as a valid step would) and spare
    # every step the selection's extra pass.
    usable = usable_lr(lr)
    keep = None
    if found_inf is not None:
        keep = (found_inf == 0) & usable
    else:
        coef_p = torch.where(usable, coef_p, 1.0)
        coef_g = torch.where(usable, coef_g, 0.0)
    if new_max is not None:
        new_max = torch.where(usable if keep is None else keep, new_max, old_max.to(new_max.dtype))
    views = _fe.column_views(torch.stack([coef_p, coef_g], dim=1))
    vp, vg = views[0], views[1]
    acc = stats.dtype
    rounding = sr_seed is not None and params[0].dtype == torch.bfloat16
    _apply_in_pieces(params, grads, vp, vg, acc, keep, sr_seed if rounding else None)
    if new_max is not None:
        max_norm.copy_(new_max)


def _apply_in_pieces(params, grads, vp, vg, acc, keep, sr_seed):
    """The update over bounded pieces: in place for float32 without found_inf, else through an
    accumulation-dtype copy; with stochastic rounding, whole tensors."""
    low = params[0].dtype != acc
    in_place = not low and keep is None and sr_seed is None
    width = torch.empty((), dtype=acc).element_size()
    # bytes per element alive at once: the product c_g g; the accumulation-dtype copy of p
    # unless updating in place; for found_inf the where's output in the parameter's dtype
    temp = width * (1 if in_place else 2) + (params[0].element_size() if keep is not None else 0)
    whole = len(vp)
    for run in _fe.runs(params, grads, temp, split=sr_seed is None):
        cp = vp if len(run.owner) == whole else [vp[i] for i in run.owner]
        cg = vg if len(run.owner) == whole else [vg[i] for i in run.owner]
        # The gradients' products first: a gradient may be its own parameter's memory, which
        # the in-place path is about to scale.
        # A bf16/fp16 gradient times a float32 0-d tensor would stay bf16/fp16: upcast first.
        prods = [g.to(acc, copy=True) for g in run.grads] if low else torch._foreach_mul(run.grads, cg)
        if low:
            torch._foreach_mul_(prods, cg)
        if in_place:
            work = run.params
            torch._foreach_mul_(work, cp)
        elif low:
            work = [p.to(acc, copy=True) for p in run.params]
            torch._foreach_mul_(work, cp)
        else:
            work = torch._foreach_mul(run.params, cp)
        torch._foreach_add_(work, prods)
        del prods
        if in_place:
            continue
        if sr_seed is not None:
            work = [stochastic_round_bf16(w, sr_seed, i) for w, i in zip(work, run.owner)]
        _fe.write_kept(run.params, work, keep)
        del work


class Foreach:
    """The passes for ``backends/foreach.py``."""

    @staticmethod
    def run_pass(index: int, call):
        return passes.run_pass(index, call, stats, apply)
