"""Fromage's two passes as the Python backends run them, given one backend's ``stats`` and
``apply``: pass 0 reduces the norms (and ⟨p, g⟩ with ``INNER``), pass 1 updates."""
from __future__ import annotations

from .flags import INNER


def run_pass(index: int, call, stats, apply):
    params, grads = call.lists
    if index == 0:
        return stats(params, grads, bool(call.flags & INNER))
    values = call.values
    apply(params, grads, call.sums, lr=call.hyper[0], max_norm=call.scalars.get("max_norm"),
          p_bound=values["p_bound"], maximize=values["maximize"], prefactor=values["prefactor"],
          found_inf=call.found_inf, grad_scale=call.grad_scale, sr_seed=call.seed)
    return None
