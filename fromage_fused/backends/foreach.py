"""The foreach backend: ``torch._foreach_*`` over a group, every scalar kept on the device."""
from __future__ import annotations

import torch

from .._math import accumulate_dtype, coefficients, stochastic_round_bf16
from ._base import Backend


def _upcast(tensors, dtype):
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


class ForeachBackend(Backend):
    name = "foreach"
    priority = 10
    dense_only = False

    def stats(self, params, grads, *, inner=True):
        acc = accumulate_dtype(params[0].dtype)
        device = params[0].device
        p_norm = torch._foreach_norm(params, 2, dtype=acc)
        g_norm = torch._foreach_norm(grads, 2, dtype=acc)
        columns = [torch.stack(p_norm).square(), torch.stack(g_norm).square()]
        if inner:
            products = torch._foreach_mul(_upcast(params, acc), _upcast(grads, acc))
            columns.append(torch.stack([x.sum() for x in products]))
        else:
            columns.append(torch.zeros(len(params), dtype=acc, device=device))
        return torch.stack(columns, dim=1)

    def apply(self, params, grads, stats, *, lr, max_norms, p_bound, maximize, prefactor=True, found_inf=None, grad_scale=None, sr_seed=None):
        old_max = torch.stack(list(max_norms)) if p_bound is not None else None
        coef_p, coef_g, new_max = coefficients(
            stats, lr, max_norm=old_max, p_bound=p_bound, maximize=maximize, prefactor=prefactor, grad_scale=grad_scale
        )
        acc = stats.dtype
        work = _upcast(params, acc)
        if work[0] is params[0] and found_inf is not None:
            work = torch._foreach_mul(work, 1.0)
        torch._foreach_mul_(work, list(coef_p.unbind()))
        torch._foreach_add_(work, torch._foreach_mul(_upcast(grads, acc), list(coef_g.unbind())))
        if found_inf is not None:
            skip = found_inf != 0
            work = [torch.where(skip, p.to(acc), w) for p, w in zip(params, work)]
            if new_max is not None:
                new_max = torch.where(skip, old_max.to(new_max.dtype), new_max)
        if sr_seed is not None and params[0].dtype == torch.bfloat16:
            work = [stochastic_round_bf16(w, sr_seed, i) for i, w in enumerate(work)]
        if work[0] is not params[0]:
            torch._foreach_copy_(params, work)
        if new_max is not None:
            torch._foreach_copy_(list(max_norms), list(new_max.to(torch.float32).unbind()))


BACKEND = ForeachBackend()
