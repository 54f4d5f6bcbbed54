"""A group of tensors to step: the one shape the optimizer, the functional API and the DTensor route
share, the checks that make one, and the two phases that step it.

A :class:`Group` holds tensors of one device and one dtype that one backend steps together, their
``max_norm`` state, and the hyper-parameters they step with. :func:`group_tensors` validates a list
of (parameter, gradient) pairs and cuts it into groups; :func:`execute` runs the stats phase, the
optional combination of stats across ranks (DTensor shards: one all-reduce per process group), and
the apply phase.

What a backend receives from a group (the contract in ``backends/_base.py``): non-empty lists of
equal length; every tensor strided, real (complex tensors come as their ``view_as_real``), of the
group's dtype and device, which the backend supports; each gradient of its parameter's shape;
contiguous tensors when the backend sets ``dense_only`` (copies stand in for strided ones and are
written back after the apply phase).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._math import accumulate_dtype

__all__ = ["Group", "PlanList", "SUPPORTED_DTYPES", "dtype_refusal", "group_tensors", "execute", "run_stats", "run_apply"]

#: What a step can handle. Complex tensors step through their real view (of the matching real dtype).
REAL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
SUPPORTED_DTYPES = REAL_DTYPES + COMPLEX_DTYPES
_REAL = frozenset(REAL_DTYPES)
_COMPLEX = frozenset(COMPLEX_DTYPES)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)
_STRIDED = torch.strided
#: The backend that steps a dtype another backend does not take (float64 in the kernel backends).
FALLBACK = "foreach"


class PlanList(list):
    """A tensor list of a persistent step plan that stays as it is while the list is alive: the same
    tensors, each with the same storage address, shape, dtype and device (the plan hands a new list
    when any of that changes). ``memo`` is where a backend keeps what it derives from them (address
    tables, sizes), so that it is derived once per list instead of once per phase or per step."""

    __slots__ = ("memo",)

    def __init__(self, tensors=()):
        super().__init__(tensors)
        self.memo = {}


def dtype_refusal(dtype: torch.dtype) -> Optional[str]:
    """Why a parameter of ``dtype`` cannot be stepped and what to do instead; None if it can."""
    if dtype in _SUPPORTED:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
    if not (dtype.is_floating_point or dtype.is_complex):
        return (f"Fromage steps floating-point and complex tensors only ({names}), got a {dtype} parameter; "
                "leave integer and bool tensors out of the optimizer (buffers, or requires_grad=False)")
    return (f"Fromage cannot step {dtype} parameters (it steps {names}); keep the weights in one of these "
            "(e.g. bfloat16 or float32 master weights) and cast to the low-precision format for compute")


@dataclass(eq=False)
class Group:
    """Tensors of one (device, dtype) that one backend steps together, and how they step.

    ``params`` and ``grads`` are what the backend sees (real views of complex tensors, contiguous
    copies of strided ones for a ``dense_only`` backend); ``indices`` are their positions in the
    caller's list. ``max_norms`` is None without ``p_bound``, else the parameters' 0-d float32
    ``max_norm`` state tensors on ``device``; ``max_norm``, when set, is one ``[n]`` tensor whose
    entries are those tensors (they are views of it: see :func:`adopt_max_norms`), else each apply
    phase steps a stacked copy and writes it back. ``reduce``: for shards of DTensor parameters,
    the process group over which the stats are partial sums (None: the tensors are whole).
    """

    device: torch.device
    dtype: torch.dtype
    backend: "object"
    params: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)
    max_norms: Optional[List[torch.Tensor]] = None
    max_norm: Optional[torch.Tensor] = None
    indices: List[int] = field(default_factory=list)
    lr: object = None
    p_bound: Optional[float] = None
    maximize: bool = False
    prefactor: bool = True
    sr_seed: Optional[torch.Tensor] = None
    reduce: Optional[Tuple[object, str]] = None
    #: (position in params, the strided tensor a contiguous copy stands for): written back after apply.
    writeback: List[Tuple[int, torch.Tensor]] = field(default_factory=list)
    #: The tensors as the caller holds them (complex, strided, DTensor), one per entry of ``params``.
    sources: List[torch.Tensor] = field(default_factory=list)
    # The last float lr and its device tensor: a new tensor only when the value changes.
    _lr_value: object = None
    _lr_tensor: Optional[torch.Tensor] = None


def _check_pair(i: int, p: torch.Tensor, g: torch.Tensor, eager: bool = True) -> None:
    """Raise the error that explains what is wrong with parameter ``i`` and its gradient."""
    if g.is_sparse or g.layout != _STRIDED:
        raise RuntimeError(
            f"Fromage does not support sparse gradients (parameter {i} has a {g.layout} gradient); "
            "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
        )
    if p.is_sparse or p.layout != _STRIDED:
        raise RuntimeError(f"Fromage does not support sparse parameters (parameter {i} is {p.layout})")
    refusal = dtype_refusal(p.dtype)
    if refusal is not None:
        raise RuntimeError(f"parameter {i}: {refusal}")
    if g.shape != p.shape:
        raise RuntimeError(f"parameter {i} has shape {tuple(p.shape)} but its gradient has shape {tuple(g.shape)}")
    if g.dtype != p.dtype:
        raise RuntimeError(f"parameter {i} is {p.dtype} but its gradient is {g.dtype}; cast the gradient to the parameter's dtype")
    if g.device != p.device:
        raise RuntimeError(f"parameter {i} is on {p.device} but its gradient is on {g.device}")
    if eager and (p.is_conj() or p.is_neg()):
        raise RuntimeError(f"parameter {i} is a lazily conjugated or negated view; step the tensor it views "
                           "(or resolve it with .resolve_conj() / .resolve_neg())")


def _resolved(g: torch.Tensor) -> torch.Tensor:
    """A gradient without a lazy conjugate or negative bit (kernels read raw storage)."""
    return g.resolve_conj().resolve_neg()


def group_tensors(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    max_norms: Optional[Sequence[torch.Tensor]],
    backend_for: Callable[[torch.device], object],
    fallback: Callable[[], object],
) -> List[Group]:
    """Validate every (parameter, gradient) pair and group them by (device, dtype); modify nothing.

    ``backend_for(device)`` is the backend for a device; a dtype it does not support goes to
    ``fallback()``. Raises before any tensor is touched, so a bad step leaves everything as it was.
    """
    groups: Dict[Tuple[torch.device, torch.dtype], Group] = {}
    # Lazy negation bits exist only in eager mode (torch.compile traces through them, and cannot
    # trace the query).
    eager = not torch.compiler.is_compiling()
    for i, (p, g) in enumerate(zip(params, grads)):
        # The common case in a few attribute reads; anything else goes through the checks that
        # explain what is wrong.
        dtype = p.dtype
        source = p
        if not (
            g.layout is _STRIDED and p.layout is _STRIDED and g.dtype is dtype
            and dtype in _REAL and g.shape == p.shape and g.device == p.device
            and not (eager and (g.is_neg() or p.is_neg()))
        ):
            _check_pair(i, p, g, eager)
            if eager:
                g = _resolved(g)
            if dtype in _COMPLEX:
                p, g = torch.view_as_real(p), torch.view_as_real(g)
        key = (p.device, p.dtype)
        group = groups.get(key)
        if group is None:
            chosen = backend_for(p.device)
            if not chosen.supports_dtype(p.dtype):
                chosen = fallback()
            group = groups[key] = Group(p.device, p.dtype, chosen, max_norms=None if max_norms is None else [])
        if not eager and source.is_complex():
            # A traced graph cannot have an op mutate a view of another dtype of its input (torch
            # fails to compile it, or reads out of bounds): the step writes a real copy, copied back.
            group.writeback.append((len(group.params), source))
            p = p.clone()
        group.params.append(p)
        group.grads.append(g)
        group.indices.append(i)
        group.sources.append(source)
        if max_norms is not None:
            m = max_norms[i]
            if m.dtype != torch.float32 or m.dim() != 0 or m.device != p.device:
                raise RuntimeError(f"max_norm of parameter {i} must be a 0-d float32 tensor on {p.device}")
            group.max_norms.append(m)
    for group in groups.values():
        make_dense(group)
    return list(groups.values())


def _write_back(original: torch.Tensor, result: torch.Tensor) -> None:
    original.copy_(torch.view_as_complex(result) if original.is_complex() and not result.is_complex() else result)


def consecutive_view(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The 1-d tensor whose entries are the 0-d ``tensors`` (consecutive elements of one storage,
    in order), or None if they are not laid out so."""
    first = tensors[0]
    base, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for i, t in enumerate(tensors):
        if t.storage_offset() != offset + i or t.untyped_storage().data_ptr() != base:
            return None
    return first.as_strided((len(tensors),), (1,))


def adopt_max_norms(group: Group, put: Callable[[int, torch.Tensor], None], *, lay_out: bool = True) -> None:
    """Give a bounded group one ``[n]`` max_norm tensor that its backend reads and writes in place
    (one argument instead of n). Where the state tensors are not already consecutive views of one
    storage, they are replaced by views of a new one holding their values (``put(j, view)`` stores
    the view of parameter ``j`` of the group as its state), or, without ``lay_out``, left as they
    are: the group then steps a stacked copy (see :func:`run_apply`)."""
    view = consecutive_view(group.max_norms)
    if view is None:
        if not lay_out:
            return
        view = torch.stack(list(group.max_norms))
        group.max_norms = list(view.unbind())
        for j, m in enumerate(group.max_norms):
            put(j, m)
    group.max_norm = view


def make_dense(group: Group) -> None:
    """For a ``dense_only`` backend, contiguous copies stand in for strided tensors (parameters are
    written back after the apply phase)."""
    if not group.backend.dense_only:
        return
    copies = {i for i, _ in group.writeback}
    for i, (p, g) in enumerate(zip(group.params, group.grads)):
        if i not in copies and not p.is_contiguous():
            group.params[i] = p.contiguous()
            group.writeback.append((i, p))
        if not g.is_contiguous():
            group.grads[i] = g.contiguous()


def _device_scalar(value, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype, non_blocking=True).reshape(())
    return torch.full((), value, device=device, dtype=dtype)


def _lr_of(group: Group) -> torch.Tensor:
    lr = group.lr
    if isinstance(lr, torch.Tensor):
        return lr.to(device=group.device, dtype=accumulate_dtype(group.dtype), non_blocking=True).reshape(())
    if group._lr_tensor is None or group._lr_value != lr or type(group._lr_value) is not type(lr):
        # float(): lr may be any real number the checks accept (a Fraction, a numpy scalar).
        group._lr_tensor = torch.full((), float(lr), device=group.device, dtype=accumulate_dtype(group.dtype))
        group._lr_value = lr
    return group._lr_tensor


def _stacked(tensors: List[torch.Tensor]) -> torch.Tensor:
    """A new 1-d tensor holding the values of the 0-d ``tensors``. Traced, as copies into a new
    tensor: inductor turns ``stack`` of one view of an input into a read at the storage's start
    (another parameter's max_norm when the view is not the first of its storage)."""
    if not torch.compiler.is_compiling():
        return torch.stack(tensors)
    out = torch.empty(len(tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    torch._foreach_copy_(list(out.unbind()), tensors)
    return out


def run_stats(group: Group, *, inner: Optional[bool] = None) -> torch.Tensor:
    """Phase 1 for one group: ``[n, 3]`` stats of its tensors (as stored locally). ``inner``
    defaults to whether the group has a p_bound (only the clamp reads ``<p, g>``)."""
    if inner is None:
        inner = group.p_bound is not None
    return group.backend.stats(group.params, group.grads, inner=inner)


def run_apply(
    group: Group,
    stats: torch.Tensor,
    *,
    found_inf: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """Phase 2 for one group: the update from (possibly all-reduced) stats, with the group's
    hyper-parameters."""
    device = group.device
    max_norm = group.max_norm
    # Without one max_norm tensor (the functional API, a compiled or captured step): a stacked
    # copy, written back to the parameters' state tensors.
    copied = max_norm is None and group.p_bound is not None
    if copied:
        max_norm = _stacked(group.max_norms)
    group.backend.apply(
        group.params,
        group.grads,
        stats,
        lr=_lr_of(group),
        max_norm=max_norm,
        p_bound=group.p_bound,
        maximize=group.maximize,
        prefactor=group.prefactor,
        found_inf=None if found_inf is None else _device_scalar(found_inf, device),
        grad_scale=None if grad_scale is None else _device_scalar(grad_scale, device),
        sr_seed=None if group.sr_seed is None else group.sr_seed.to(device, non_blocking=True).reshape(()),
    )
    if copied:
        torch._foreach_copy_(list(group.max_norms), list(max_norm.unbind()))
    for i, original in group.writeback:
        _write_back(original, group.params[i])


def _as(stats: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # A caller's reduce_stats may hand back another dtype or layout; backends get what stats gave.
    return stats.to(device=like.device, dtype=like.dtype).contiguous()


def execute(
    groups: Sequence[Group],
    *,
    found_inf: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    reduce_stats: Optional[Callable[[torch.Tensor, Group], torch.Tensor]] = None,
    monitor: Optional[list] = None,
) -> None:
    """Step ``groups``: whole tensors one group at a time; the shards of each process group with
    one combination of their stats between the phases (``distributed.all_reduce_stats``).
    ``reduce_stats(stats, group)``, when given, replaces each group's stats before its apply.
    ``monitor``: a list that receives one ``_monitor.Record`` per group (the stats then include
    ``<p, g>``)."""
    inner = None if monitor is None else True
    pending: Dict[object, List[Group]] = {}
    for group in groups:
        if group.reduce is not None:
            pending.setdefault(group.reduce, []).append(group)
            continue
        stats = run_stats(group, inner=inner)
        if reduce_stats is not None:
            stats = _as(reduce_stats(stats, group), stats)
        _apply(group, stats, found_inf, grad_scale, monitor)
    if pending:
        from .distributed import all_reduce_stats

        for (process_group, device_type), members in pending.items():
            stats = all_reduce_stats([run_stats(g, inner=inner) for g in members], process_group, device_type)
            for group, s in zip(members, stats):
                if reduce_stats is not None:
                    s = _as(reduce_stats(s, group), s)
                _apply(group, s, found_inf, grad_scale, monitor)


def _apply(group: Group, stats: torch.Tensor, found_inf, grad_scale, monitor) -> None:
    if monitor is not None:
        from . import _monitor

        monitor.append(_monitor.record(group, stats, _lr_of(group), found_inf, grad_scale))
    run_apply(group, stats, found_inf=found_inf, grad_scale=grad_scale)
