"""LARS's two passes as the Python backends run them, given one backend's ``stats`` and ``apply``:
pass 0 reduces the norms, pass 1 updates (the buffer list is absent without momentum) and, when
monitoring, returns ``[n, 1]``: ‖u‖² of its step ``p ← p − lr·u`` per tensor."""
from __future__ import annotations

from .flags import MOMENTUM


def run_pass(index: int, call, stats, apply):
    if index == 0:
        params, grads = call.lists
        return stats(params, grads, call.flags)
    if call.flags & MOMENTUM:
        params, bufs, grads = call.lists
    else:
        (params, grads), bufs = call.lists, None
    return apply(params, bufs, grads, call.sums, hyper=call.hyper, values=call.values, flags=call.flags,
                 started=call.scalars.get("momentum_started"), found_inf=call.found_inf, grad_scale=call.grad_scale,
                 sr_seed=call.seed)
