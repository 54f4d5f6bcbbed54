"""The foreach backend: ``torch._foreach_*`` over a group, every scalar kept on the device; the
rules' foreach math (``rules/<name>/foreach.py``) runs on the helpers here.

Host work: per-tensor coefficients are written into one ``[n, k]`` buffer per step and handed to
the foreach ops as views of it made once (per device, dtype, group size and thread), not as ``n``
new 0-d tensors per step (:func:`column_views`).

Memory: everything that needs temporaries (products, float32 copies of bf16/fp16 tensors, the
``found_inf`` selection) runs over bounded pieces (:func:`runs`): runs of whole tensors, and
slices of one large contiguous tensor, of at most ``max(the largest tensor's bytes, 16 MiB)`` of
temporaries at a time.

Accuracy: on CPU, norms are summed over pieces of ``PIECE`` elements and combined as a tree, as
the CPU kernels do (torch's norm of one long tensor drifts with its length): :func:`norm_piece`.
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


#: Norms are summed over flat pieces of this many elements (the CPU kernels' chunk) and the
#: pieces' sums combined as a tree: torch's CPU norm of one long tensor accumulates in a way whose
#: error grows with its length (1e-3 relative for 20M float32 elements, more for the L1 norms of
#: <p, g>). CUDA's ``_foreach_norm`` already sums per chunk: tensors there stay whole.
PIECE = 32768
_numel = torch.Tensor.numel


def norm_piece(params) -> Optional[int]:
    """The pieces a rule's norms and inner products are summed over for these tensors (``runs``'s
    ``piece``): ``PIECE`` on CPU, None (whole tensors) on CUDA."""
    return None if params[0].device.type == "cuda" else PIECE


def runs(params, grads, temp_per_element: int, *, split: bool = True,
         indices: Optional[Sequence[int]] = None, piece: Optional[int] = None) -> List[_Piece]:
    """Runs of (parameter, gradient) pieces whose temporaries (``temp_per_element`` bytes per
    element) stay within the budget; a contiguous tensor larger than that is cut into flat slices
    (``split``), and with ``piece`` every contiguous tensor larger than ``piece`` elements. The
    whole group is one run when it fits and nothing is cut, the common case."""
    sizes = list(map(_numel, params))
    largest = max(sizes)
    # the bytes of the largest tensor (a group has one dtype), at least the floor
    limit = max(1, max(FLOOR_BYTES, largest * params[0].element_size()) // max(temp_per_element, 1))
    indices = range(len(params)) if indices is None else indices
    if piece is not None and largest <= piece:
        piece = None
    if piece is None and sum(sizes) <= limit:
        return [_Piece(list(params), list(grads), list(indices))]
    cut = min(piece or limit, limit) if split else piece
    runs, ps, gs, owner, size = [], [], [], [], 0
    for i, p, g, n in zip(indices, params, grads, sizes):
        if cut is not None and n > cut and p.is_contiguous() and g.is_contiguous():
            fp, fg = p.view(-1), g.view(-1)
            entries = [(fp[start:start + cut], fg[start:start + cut],
                        min(cut, n - start)) for start in range(0, n, cut)]
        else:
            entries = [(p, g, n)]
        for ep, eg, en in entries:
            if ps and size + en > limit:
                runs.append(_Piece(ps, gs, owner))
                ps, gs, owner, size = [], [], [], 0
            ps.append(ep)
            gs.append(eg)
            owner.append(i)
            size += en
    if ps:
        runs.append(_Piece(ps, gs, owner))
    return runs


def combine(values: torch.Tensor, owner: List[int], n: int) -> torch.Tensor:
    """Per-piece sums (``[pieces]``) to per-tensor ones (``[n]``): the pieces of a tensor (consecutive
    in ``owner``) add up as a tree (torch's ``sum``)."""
    if len(owner) == n:
        return values
    first = [0] * n
    counts = [0] * n
    for k in range(len(owner) - 1, -1, -1):
        first[owner[k]] = k
        counts[owner[k]] += 1
    out = values[first]
    for i, count in enumerate(counts):
        if count > 1:
            out[i] = values[first[i]:first[i] + count].sum()
    return out


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


def write_kept(targets: Sequence[torch.Tensor], results: Sequence[torch.Tensor], keep) -> None:
    """Copy ``results`` into ``targets`` (cast to their dtype); where ``keep`` (a 0-d bool tensor: the
    step is applied) is False, the targets keep their values: a skipped step is a selection on the
    device, never a host branch."""
    if keep is None:
        torch._foreach_copy_(list(targets), list(results))
        return
    for t, r in zip(targets, results):
        torch.where(keep, r if r.dtype == t.dtype else r.to(t.dtype), t, out=t)


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
