"""A group of tensors to step: the one shape the optimizer, the functional APIs and the DTensor route
share, and the checks that make one.

A :class:`Group` holds tensors of one device and one dtype that one backend steps together with
one rule: the parameters, their gradients, the lists of the rule's elementwise buffers, its
per-tensor scalar state, its per-group scalars, and the hyper-parameters they step with.
:func:`group_tensors` validates a list of (parameter, gradient) pairs and cuts it into groups.

What a backend receives from a group (the contract in ``backends/_base.py``): non-empty lists of
equal length; every tensor strided, real (complex tensors come as their ``view_as_real``), of the
group's dtype and device (buffers: of the buffer dtype), which the backend supports; each gradient
and buffer of its parameter's shape; contiguous tensors when the backend sets ``dense_only``
(copies stand in for strided ones and are written back after the step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import dtypes as _dtypes

__all__ = ["Group", "Scalars", "PlanList", "group_tensors", "consecutive_view", "lay_out", "make_dense"]

_STRIDED = torch.strided


class PlanList(list):
    """A tensor list of a persistent step plan that stays as it is while the list is alive: the same
    tensors, each with the same storage address, shape, dtype and device (the plan hands a new list
    when any of that changes). ``memo`` is where a backend keeps what it derives from them (address
    tables, sizes), so that it is derived once per list instead of once per pass or per step."""

    __slots__ = ("memo",)

    def __init__(self, tensors=()):
        super().__init__(tensors)
        self.memo = {}


@dataclass(eq=False)
class Scalars:
    """Per-tensor scalar state of a group: ``entries`` are the parameters' 0-d state tensors;
    ``laid``, when set, is one ``[n]`` tensor whose entries they are (views of it: see
    :func:`lay_out`), which the kernels read and write in place; else each step steps a stacked
    copy and writes it back."""

    entries: List[torch.Tensor]
    laid: Optional[torch.Tensor] = None


@dataclass(eq=False)
class Group:
    """Tensors of one (device, dtype) that one backend steps together with one rule, and how.

    ``params`` and ``grads`` are what the backend sees (real views of complex tensors, contiguous
    copies of strided ones for a ``dense_only`` backend); ``indices`` are their positions in the
    caller's list. ``reduce``: for shards of DTensor parameters, the process group over which
    per-tensor sums are partial (None: the tensors are whole).
    """

    device: torch.device
    dtype: torch.dtype
    backend: Any
    rule: Any
    params: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)
    #: elementwise state lists by buffer name, aligned with ``params``
    buffers: Dict[str, List[torch.Tensor]] = field(default_factory=dict)
    #: per-tensor scalar state by name
    scalars: Dict[str, Scalars] = field(default_factory=dict)
    #: per-group scalar state by name (0-d device tensors)
    counters: Dict[str, torch.Tensor] = field(default_factory=dict)
    indices: List[int] = field(default_factory=list)
    #: the hyper-parameters, as the param group holds them (per-step values refreshed every step)
    values: Dict[str, Any] = field(default_factory=dict)
    reduce: Optional[Tuple[object, str]] = None
    #: (list name, position, the strided tensor a contiguous copy stands for): written back after the step
    writeback: List[Tuple[str, int, torch.Tensor]] = field(default_factory=list)
    #: The tensors as the caller holds them (complex, strided, DTensor), one per entry of ``params``.
    sources: List[torch.Tensor] = field(default_factory=list)
    #: the packed hyper-parameters of the last step and their numbers (``Spec.pack``)
    packed: dict = field(default_factory=dict)

    def lists(self, names: Sequence[str]) -> Tuple[List[torch.Tensor], ...]:
        """The tensor lists a pass names (``"p"``, ``"g"``, buffer names)."""
        return tuple(self.params if n == "p" else self.grads if n == "g" else self.buffers[n] for n in names)


def _check_pair(i: int, p: torch.Tensor, g: torch.Tensor, title: str, eager: bool = True) -> None:
    """Raise the error that explains what is wrong with parameter ``i`` and its gradient."""
    if g.is_sparse or g.layout != _STRIDED:
        raise RuntimeError(
            f"{title} does not support sparse gradients (parameter {i} has a {g.layout} gradient); "
            "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
        )
    if p.is_sparse or p.layout != _STRIDED:
        raise RuntimeError(f"{title} does not support sparse parameters (parameter {i} is {p.layout})")
    refusal = _dtypes.refusal(p.dtype, title)
    if refusal is not None:
        raise RuntimeError(f"parameter {i}: {refusal}")
    if g.shape != p.shape:
        raise RuntimeError(f"parameter {i} has shape {tuple(p.shape)} but its gradient has shape {tuple(g.shape)}")
    if g.dtype != p.dtype:
        raise RuntimeError(f"parameter {i} is {p.dtype} but its gradient is {g.dtype}; "
                           "cast the gradient to the parameter's dtype")
    if g.device != p.device:
        raise RuntimeError(f"parameter {i} is on {p.device} but its gradient is on {g.device}")
    if eager and (p.is_conj() or p.is_neg()):
        raise RuntimeError(f"parameter {i} is a lazily conjugated or negated view; step the tensor it views "
                           "(or resolve it with .resolve_conj() / .resolve_neg())")


def _check_buffer(i: int, name: str, b: torch.Tensor, p: torch.Tensor) -> None:
    want = _dtypes.buffer_dtype(p.dtype)
    if not isinstance(b, torch.Tensor) or b.layout != _STRIDED or b.shape != p.shape or b.dtype != want \
            or b.device != p.device:
        raise RuntimeError(f"{name} of parameter {i} must be a strided {want} tensor of shape {tuple(p.shape)} on "
                           f"{p.device}")


def group_tensors(
    rule,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    backend_for: Callable[[torch.device], object],
    fallback: Callable[[], object],
    *,
    scalars: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
    buffers: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
) -> List[Group]:
    """Validate every (parameter, gradient) pair, and the state given with them, and group them by
    (device, dtype); modify nothing.

    ``backend_for(device)`` is the backend for a device; a rule or dtype it does not step goes to
    ``fallback()``. ``scalars``: per-tensor scalar state by name, one 0-d tensor per parameter;
    ``buffers``: elementwise state by name, one tensor per parameter. Raises before any tensor is
    touched, so a bad step leaves everything as it was.
    """
    scalars = dict(scalars or {})
    buffers = dict(buffers or {})
    fixed = rule.fixed_dtypes()
    groups: Dict[Tuple[torch.device, torch.dtype], Group] = {}
    # Lazy negation bits exist only in eager mode (torch.compile traces through them, and cannot
    # trace the query).
    eager = not torch.compiler.is_compiling()
    for i, (p, g) in enumerate(zip(params, grads)):
        source = p
        p, g = _checked_pair(i, p, g, rule.title, eager)
        key = (p.device, p.dtype)
        group = groups.get(key)
        if group is None:
            group = groups[key] = _new_group(rule, p, backend_for, fallback, scalars, buffers)
        if not eager and source.is_complex():
            # A traced graph cannot have an op mutate a view of another dtype of its input (torch
            # fails to compile it, or reads out of bounds): the step writes a real copy, copied back.
            group.writeback.append(("p", len(group.params), source))
            p = p.clone()
        group.params.append(p)
        group.grads.append(g)
        group.indices.append(i)
        group.sources.append(source)
        for name, entries in scalars.items():
            group.scalars[name].entries.append(_checked_scalar(i, name, entries[i], fixed.get(name, torch.float32), p))
        for name, entries in buffers.items():
            b = entries[i]
            _check_buffer(i, name, b, source)
            if b.is_complex():
                real = torch.view_as_real(b)
                if not eager:  # (as for the parameter above)
                    group.writeback.append((name, len(group.buffers[name]), b))
                    real = real.clone()
                b = real
            group.buffers[name].append(b)
    for group in groups.values():
        make_dense(group)
    return list(groups.values())


def _checked_pair(i: int, p: torch.Tensor, g: torch.Tensor, title: str, eager: bool):
    """``(p, g)`` as a backend steps them (real views of complex tensors, resolved lazy bits), or
    the error that explains what is wrong. The common case in a few attribute reads."""
    dtype = p.dtype
    if (g.layout is _STRIDED and p.layout is _STRIDED and g.dtype is dtype and dtype in _dtypes.REAL
            and g.shape == p.shape and g.device == p.device and not (eager and (g.is_neg() or p.is_neg()))):
        return p, g
    _check_pair(i, p, g, title, eager)
    if eager:
        g = g.resolve_conj().resolve_neg()
    if dtype in _dtypes.COMPLEX:
        p, g = torch.view_as_real(p), torch.view_as_real(g)
    return p, g


def _new_group(rule, p: torch.Tensor, backend_for, fallback, scalars, buffers) -> Group:
    chosen = backend_for(p.device)
    if not chosen.supports(rule, p.dtype):
        chosen = fallback()
    group = Group(p.device, p.dtype, chosen, rule)
    group.scalars = {name: Scalars([]) for name in scalars}
    group.buffers = {name: [] for name in buffers}
    return group


def _checked_scalar(i: int, name: str, m: torch.Tensor, dtype: torch.dtype, p: torch.Tensor) -> torch.Tensor:
    if m.dtype != dtype or m.dim() != 0 or m.device != p.device:
        raise RuntimeError(f"{name} of parameter {i} must be a 0-d {str(dtype).replace('torch.', '')} tensor "
                           f"on {p.device}")
    return m


def consecutive_view(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The 1-d tensor whose entries are the 0-d ``tensors`` (consecutive elements of one storage,
    in order), or None if they are not laid out so."""
    first = tensors[0]
    base, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for i, t in enumerate(tensors):
        if t.storage_offset() != offset + i or t.untyped_storage().data_ptr() != base:
            return None
    return first.as_strided((len(tensors),), (1,))


def lay_out(scalars: Scalars, put: Callable[[int, torch.Tensor], None], *, new: bool = True) -> None:
    """Give a group's per-tensor scalar state one ``[n]`` tensor that its backend reads and writes
    in place (one argument instead of n). Where the state tensors are not already consecutive views
    of one storage, they are replaced by views of a new one holding their values (``put(j, view)``
    stores the view of parameter ``j`` of the group as its state), or, without ``new``, left as
    they are: the group then steps a stacked copy."""
    view = consecutive_view(scalars.entries)
    if view is None:
        if not new:
            return
        view = torch.stack(list(scalars.entries))
        scalars.entries = list(view.unbind())
        for j, m in enumerate(scalars.entries):
            put(j, m)
    scalars.laid = view


def make_dense(group: Group) -> None:
    """For a ``dense_only`` backend, contiguous copies stand in for strided tensors (parameters and
    buffers are written back after the step)."""
    if not group.backend.dense_only:
        return
    copies = {(name, i) for name, i, _ in group.writeback}
    for i, (p, g) in enumerate(zip(group.params, group.grads)):
        if ("p", i) not in copies and not p.is_contiguous():
            group.params[i] = p.contiguous()
            group.writeback.append(("p", i, p))
        if not g.is_contiguous():
            group.grads[i] = g.contiguous()
    for name, entries in group.buffers.items():
        for i, b in enumerate(entries):
            if (name, i) not in copies and not b.is_contiguous():
                entries[i] = b.contiguous()
                group.writeback.append((name, i, b))
