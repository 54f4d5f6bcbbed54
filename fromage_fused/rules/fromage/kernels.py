"""Fromage's passes on the triton backend (until its kernels are generic)."""
from __future__ import annotations

from .flags import INNER


def _apply_args(call):
    values = call.values
    p_bound = values["p_bound"]
    return dict(lr=call.hyper[0], max_norm=call.scalars.get("max_norm") if p_bound is not None else None,
                p_bound=p_bound, maximize=values["maximize"], prefactor=values["prefactor"],
                found_inf=call.found_inf, grad_scale=call.grad_scale, sr_seed=call.seed)


class Triton:
    @staticmethod
    def run_pass(index: int, call, backend):
        params, grads = call.lists
        if index == 0:
            return backend.stats(params, grads, inner=bool(call.flags & INNER))
        backend.apply(params, grads, call.sums, **_apply_args(call))
        return None
