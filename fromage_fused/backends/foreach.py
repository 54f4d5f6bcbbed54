"""The foreach backend: ``torch._foreach_*`` over a group, every scalar kept on the device; the
rules' foreach math (``rules/<name>/foreach.py``) runs on the helpers here.

Host work: per-tensor coefficients are written into one ``[n, k]`` buffer per step and handed to
the foreach ops as views of it made once (per device, dtype, group size and thread), not as ``n``
new 0-d tensors per step (:func:`column_views`).

Memory: everything that needs temporaries (products, float32 copies of bf16/fp16 tensors, the
``found_inf`` selection) runs over bounded pieces (:func:`runs`): runs of whole tensors, and
slices of one large contiguous tensor, of at most ``max(the largest tensor's bytes, 16 MiB)`` of
temporaries at a time.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._base import Backend

#: Temporaries of one step at a time, in bytes, at least (below it, splitting only adds launches).
FLOOR_BYTES = 16 * 2**20


class _Piece:
    """A run of (parameter, gradient) pieces; ``owner[k]`` is the tensor index of piece ``k``."""

    __slots__ = ("params", "grads", "owner")

    def __init__(self, params, grads, owner):
        self.params, self.grads, self.owner = params, grads, owner


def _budget(params) -> int:
    return max(FLOOR_BYTES, max(p.numel() * p.element_size() for p in params))


def runs(params, grads, temp_per_element: int, *, split: bool = True,
         indices: Optional[Sequence[int]] = None) -> List[_Piece]:
    """Runs of (parameter, gradient) pieces whose temporaries (``temp_per_element`` bytes per
    element) stay within the budget; a contiguous tensor larger than that is cut into flat slices
    (``split``). The whole group is one run when it fits, the common case."""
    budget = _budget(params)
    limit = max(1, budget // max(temp_per_element, 1))
    indices = range(len(params)) if indices is None else indices
    total = sum(p.numel() for p in params)
    if total <= limit:
        return [_Piece(list(params), list(grads), list(indices))]
    runs, ps, gs, owner, size = [], [], [], [], 0
    for i, p, g in zip(indices, params, grads):
        n = p.numel()
        if split and n > limit and p.is_contiguous() and g.is_contiguous():
            if ps:
                runs.append(_Piece(ps, gs, owner))
                ps, gs, owner, size = [], [], [], 0
            fp, fg = p.view(-1), g.view(-1)
            for start in range(0, n, limit):
                runs.append(_Piece([fp[start:start + limit]], [fg[start:start + limit]], [i]))
            continue
        if ps and size + n > limit:
            runs.append(_Piece(ps, gs, owner))
            ps, gs, owner, size = [], [], [], 0
        ps.append(p)
        gs.append(g)
        owner.append(i)
        size += n
    if ps:
        runs.append(_Piece(ps, gs, owner))
    return runs


def combine(values: torch.Tensor, owner: List[int], n: int) -> torch.Tensor:
    """Per-piece sums (``[pieces]``) to per-tensor ones (``[n]``): the slices of a tensor add up."""
    if len(owner) == n:
        return values
    parts = values.unbind()
    out: List[Optional[torch.Tensor]] = [None] * n
    for i, v in zip(owner, parts):
        out[i] = v if out[i] is None else out[i] + v
    return torch.stack(out)


class _Coefficients(threading.local):
    """Per thread: one ``[n, 3]`` buffer per (device, dtype, n, stream) and its column views, made
    once; a step writes its coefficients into the buffer with one copy and the foreach ops read
    them through the views. (A CUDA stream of its own per key: steps on two streams never share.)"""

    def __init__(self):
        self.cache: Dict[Tuple, Tuple[torch.Tensor, List[List[torch.Tensor]]]] = {}

    def views(self, columns: torch.Tensor) -> List[List[torch.Tensor]]:
        n, k = columns.shape
        device = columns.device
        stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None
        key = (device, columns.dtype, n, k, stream)
        hit = self.cache.get(key)
        if hit is None:
            if len(self.cache) >= 64:
                self.cache.clear()
            buffer = torch.empty(n, k, dtype=columns.dtype, device=device)
            hit = self.cache[key] = (buffer, [list(buffer[:, j].unbind()) for j in range(k)])
        hit[0].copy_(columns)
        return hit[1]


_coefficients = _Coefficients()


def column_views(columns: torch.Tensor) -> List[List[torch.Tensor]]:
    if torch.compiler.is_compiling():  # traced once; a cache would only add guards
        return [list(c.unbind()) for c in columns.unbind(1)]
    return _coefficients.views(columns)


class ForeachBackend(Backend):
    name = "foreach"
    priority = 10
    dense_only = False
    kind = "foreach"


BACKEND = ForeachBackend()
