"""Fromage's two passes called on a backend directly, without planning: lists in, nothing checked
or converted on the way (for tests of a backend, and for callers that hold validated groups)."""
from __future__ import annotations

from typing import Optional

import torch

from ...engine.dtypes import accumulate_dtype
from ...engine.execute import Call
from .rule import FROMAGE


def _call(index, params, grads, *, sums=None, lr=None, max_norm=None, p_bound=None, maximize=False, prefactor=True,
          found_inf=None, grad_scale=None, sr_seed=None, monitor=True) -> Call:
    call = Call()
    call.group, call.rule, call.index = None, FROMAGE, index
    call.lists, call.writes = (params, grads), index
    call.n = len(params)
    default = lr.device if isinstance(lr, torch.Tensor) else torch.device("cpu")
    call.device = params[0].device if len(params) else default
    call.dtype = params[0].dtype if len(params) else torch.float32
    values = dict(lr=0.0 if lr is None else lr, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
                  stochastic_rounding=sr_seed is not None)
    call.values = values
    acc = accumulate_dtype(call.dtype) if lr is None or not isinstance(lr, torch.Tensor) else lr.dtype
    call.hyper = FROMAGE.spec.pack(values, call.device, acc, {})
    call.flags = FROMAGE.flags(values, monitor)
    call.scalars = {} if max_norm is None else {"max_norm": max_norm}
    call.scalar_list = [] if max_norm is None or p_bound is None else [max_norm]
    call.seed = sr_seed
    call.counters = {}
    call.sums, call.globals = sums, None
    call.found_inf, call.grad_scale = found_inf, grad_scale
    call.memo = {}
    return call


def stats(backend, params, grads, *, inner: bool = True) -> torch.Tensor:
    """Pass 0: ``[n, 3]`` of ``||p||^2, ||g||^2, <p, g>`` (the last zeros when not ``inner``)."""
    return backend.run_pass(FROMAGE, 0, _call(0, params, grads, monitor=inner))


def apply(backend, params, grads, stats: torch.Tensor, *, lr: torch.Tensor, max_norm: Optional[torch.Tensor],
          p_bound: Optional[float], maximize: bool, prefactor: bool = True, found_inf: Optional[torch.Tensor] = None,
          grad_scale: Optional[torch.Tensor] = None, sr_seed: Optional[torch.Tensor] = None) -> None:
    """Pass 1: the update of ``params`` in place from ``stats``; ``max_norm`` (with ``p_bound``) an
    ``[n]`` float32 tensor, its unset entries set in place; ``lr`` a 0-d tensor in the accumulation dtype."""
    backend.run_pass(FROMAGE, 1, _call(1, params, grads, sums=stats, lr=lr, max_norm=max_norm, p_bound=p_bound,
                                       maximize=maximize, prefactor=prefactor, found_inf=found_inf,
                                       grad_scale=grad_scale, sr_seed=sr_seed))
