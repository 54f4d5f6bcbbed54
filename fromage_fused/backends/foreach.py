"""The foreach backend: ``torch._foreach_*`` over a group, every scalar kept on the device.

Host work: the per-tensor coefficients are written into one ``[n, 3]`` buffer per step and handed
to the foreach ops as views of it made once (per device, dtype, group size and thread), not as
``n`` new 0-d tensors per step; ``<p, g>`` comes from two ``_foreach_norm(ord=1)`` passes over the
products (``sum(x) = 2 sum(max(x, 0)) - sum(|x|)``), not from a ``.sum()`` per tensor.

Arithmetic: ``p <- round(round(c_p p) + round(c_g g))``, a product and a sum each rounded on its
own, as in every backend (docs/backends.md, "Bit-identical results"): never ``addcmul``, which torch may
compute with a fused multiply-add.

Accuracy: on CPU, norms are summed over pieces of ``PIECE`` elements and combined as a tree, as
the CPU kernels do (torch's norm of one long tensor drifts with its length).

Memory: everything that needs temporaries (the product ``c_g g``, the products of the stats, the
float32 copies of bf16/fp16 tensors, the ``found_inf`` selection) runs over bounded pieces: runs of
whole tensors, and slices of one large contiguous tensor, of at most ``max(the largest tensor's
bytes, 16 MiB)`` of temporaries at a time. A float32 step without ``found_inf`` updates ``p`` in
place and allocates only the product. Stochastic rounding works on whole tensors (its hash needs
each element's index in its tensor), one at a time.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .._math import accumulate_dtype, coefficients, stochastic_round_bf16, usable_lr
from ._base import Backend

#: Temporaries of one step at a time, in bytes, at least (below it, splitting only adds launches).
FLOOR_BYTES = 16 * 2**20
_LOW = (torch.bfloat16, torch.float16)


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


def _runs(params, grads, temp_per_element: int, *, split: bool = True, indices: Optional[Sequence[int]] = None,
          piece: Optional[int] = None) -> List[_Piece]:
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
            entries = [(fp[start:start + cut], fg[start:start + cut], min(cut, n - start)) for start in range(0, n, cut)]
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


def _combine(values: torch.Tensor, owner: List[int], n: int) -> torch.Tensor:
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


def _column_views(columns: torch.Tensor) -> List[List[torch.Tensor]]:
    if torch.compiler.is_compiling():  # traced once; a cache would only add guards
        return [list(c.unbind()) for c in columns.unbind(1)]
    return _coefficients.views(columns)


class ForeachBackend(Backend):
    name = "foreach"
    priority = 10
    dense_only = False

    def stats(self, params, grads, *, inner=True):
        dtype = params[0].dtype
        acc = accumulate_dtype(dtype)
        low = dtype in _LOW
        n = len(params)
        # Norms in the accumulation dtype; on CPU a bf16/fp16 norm upcasts each tensor inside the
        # op, one at a time, so large ones go in slices.
        piece = None if params[0].device.type == "cuda" else PIECE
        p_norms, g_norms, owner = [], [], []
        for run in _runs(params, grads, 4 if low else 0, piece=piece):
            p_norms += torch._foreach_norm(run.params, 2, dtype=acc)
            g_norms += torch._foreach_norm(run.grads, 2, dtype=acc)
            owner += run.owner
        columns = [_combine(torch.stack(p_norms).square(), owner, n), _combine(torch.stack(g_norms).square(), owner, n)]
        if inner:
            columns.append(self._inner(params, grads, acc, low, n, piece))
        else:
            columns.append(torch.zeros(n, dtype=acc, device=params[0].device))
        return torch.stack(columns, dim=1)

    @staticmethod
    def _inner(params, grads, acc, low, n, piece) -> torch.Tensor:
        """``<p, g>`` per tensor: sum(x) = 2 sum(max(x, 0)) - sum(|x|) over the products x, with
        two L1 norms (an absolute error of a few ulps of ||p|| ||g||, which is what the clamp reads)."""
        totals, positives, owner = [], [], []
        for run in _runs(params, grads, 8 if low else 4, piece=piece):
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
        return _combine(2 * torch.stack(positives) - torch.stack(totals), owner, n)

    def apply(self, params, grads, stats, *, lr, max_norm, p_bound, maximize, prefactor=True, found_inf=None, grad_scale=None, sr_seed=None):
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
        views = _column_views(torch.stack([coef_p, coef_g], dim=1))
        vp, vg = views[0], views[1]
        acc = stats.dtype
        rounding = sr_seed is not None and params[0].dtype == torch.bfloat16
        self._apply_in_pieces(params, grads, vp, vg, acc, keep, sr_seed if rounding else None)
        if new_max is not None:
            max_norm.copy_(new_max)

    @staticmethod
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
        for run in _runs(params, grads, temp, split=sr_seed is None):
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
            if keep is None:
                torch._foreach_copy_(run.params, work)
            else:
                for p, w in zip(run.params, work):
                    torch.where(keep, w if w.dtype == p.dtype else w.to(p.dtype), p, out=p)
            del work


BACKEND = ForeachBackend()
