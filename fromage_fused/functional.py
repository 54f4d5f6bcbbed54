"""The functional form of Fromage and its two phases.

``fromage(...)`` runs one step over any list of tensors. A caller that shards tensors (FSDP2,
DTensor) passes ``reduce_stats``: it receives each group's ``[n, 3]`` stats of the local shards
between the phases and returns the stats of the whole tensors (one all-reduce per group).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import backends as _backends
from ._math import UNSET_MAX_NORM, accumulate_dtype
from .backends import Backend

__all__ = ["fromage", "check_lr", "check_p_bound", "Group", "plan", "run_stats", "run_apply", "step_groups", "UNSET_MAX_NORM"]

_FALLBACK = "foreach"


@dataclass
class Group:
    """The tensors of one (device, dtype) group and the backend that steps them."""

    device: torch.device
    dtype: torch.dtype
    backend: Backend
    params: List[torch.Tensor] = field(default_factory=list)
    grads: List[torch.Tensor] = field(default_factory=list)
    max_norms: Optional[List[torch.Tensor]] = None
    indices: List[int] = field(default_factory=list)


def check_lr(lr, *, read_tensor: bool = True) -> None:
    """ValueError unless lr is a finite number >= 0 or such a 1-element float tensor.

    ``read_tensor=False`` checks a tensor's shape and dtype only: its value stays on the device.
    """
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise ValueError(f"a tensor lr must be floating point, got {lr.dtype}")
        if not read_tensor:
            return
        value = float(lr.detach().cpu())  # at construction only: a step never reads it
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
    else:
        # A string or a bool would convert silently to a float; refuse them.
        raise ValueError(f"lr must be a number or a 1-element tensor, got {lr!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid learning rate: {lr} (must be finite and >= 0)")


def check_p_bound(p_bound) -> None:
    """ValueError unless p_bound is None or a finite number > 0."""
    if p_bound is None:
        return
    if isinstance(p_bound, bool) or not isinstance(p_bound, numbers.Real) or not math.isfinite(p_bound) or not p_bound > 0:
        raise ValueError(f"invalid p_bound: {p_bound!r} (must be None or a finite number > 0)")


_STRIDED = torch.strided
_REAL_DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))
_COMPLEX_DTYPES = frozenset((torch.complex64, torch.complex128, torch.complex32))


def _check_pair(i: int, p: torch.Tensor, g: torch.Tensor) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise RuntimeError(
            f"Fromage does not support sparse gradients (parameter {i} has a {g.layout} gradient); "
            "use dense gradients, e.g. nn.Embedding(..., sparse=False)"
        )
    if p.is_sparse or p.layout != torch.strided:
        raise RuntimeError(f"Fromage does not support sparse parameters (parameter {i} is {p.layout})")
    if g.shape != p.shape:
        raise RuntimeError(f"parameter {i} has shape {tuple(p.shape)} but its gradient has shape {tuple(g.shape)}")
    if g.dtype != p.dtype:
        raise RuntimeError(f"parameter {i} is {p.dtype} but its gradient is {g.dtype}; cast the gradient to the parameter's dtype")
    if g.device != p.device:
        raise RuntimeError(f"parameter {i} is on {p.device} but its gradient is on {g.device}")
    if not (p.is_floating_point() or p.is_complex()):
        raise RuntimeError(f"parameter {i} has dtype {p.dtype}; Fromage steps floating-point and complex tensors only")


def plan(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    max_norms: Optional[Sequence[torch.Tensor]],
    *,
    backend: Union[str, Backend] = "auto",
    p_bound: Optional[float] = None,
) -> List[Group]:
    """Validate every input and group the tensors by (device, dtype); modify nothing.

    Raises before any tensor is touched, so a bad step leaves the parameters as they were.
    """
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients")
    if max_norms is not None and len(max_norms) != len(params):
        raise ValueError(f"got {len(params)} parameters but {len(max_norms)} max_norm tensors")
    if p_bound is not None and max_norms is None:
        raise ValueError("p_bound is set: pass one max_norm tensor per parameter")
    groups: Dict[Tuple[torch.device, torch.dtype], Group] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        # The common case in a few attribute reads (this loop runs for every tensor of every
        # step); anything else goes through the checks that explain what is wrong.
        dtype = p.dtype
        if not (
            g.layout is _STRIDED and p.layout is _STRIDED and g.dtype is dtype
            and dtype in _REAL_DTYPES and g.shape == p.shape and g.device == p.device
        ):
            _check_pair(i, p, g)
            if dtype in _COMPLEX_DTYPES:
                p, g = torch.view_as_real(p), torch.view_as_real(g)
        key = (p.device, p.dtype)
        group = groups.get(key)
        if group is None:
            chosen = backend if isinstance(backend, Backend) else _backends.resolve(backend, p.device)
            if not chosen.supports_dtype(p.dtype):
                chosen = _backends.get(_FALLBACK)
            group = groups[key] = Group(p.device, p.dtype, chosen, max_norms=[] if p_bound is not None else None)
        group.params.append(p)
        group.grads.append(g)
        group.indices.append(i)
        if p_bound is not None:
            m = max_norms[i]
            if m.dtype != torch.float32 or m.dim() != 0 or m.device != p.device:
                raise RuntimeError(f"max_norm of parameter {i} must be a 0-d float32 tensor on {p.device}")
            group.max_norms.append(m)
    return list(groups.values())


def _device_scalar(value, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype, non_blocking=True).reshape(())
    return torch.full((), value, device=device, dtype=dtype)


def run_stats(group: Group, *, inner: bool = True) -> torch.Tensor:
    """Phase 1 for one group: ``[n, 3]`` stats of its tensors (as stored locally)."""
    return group.backend.stats(group.params, group.grads, inner=inner)


def run_apply(
    group: Group,
    stats: torch.Tensor,
    *,
    lr,
    p_bound: Optional[float],
    maximize: bool = False,
    prefactor: bool = True,
    found_inf: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    sr_seed: Optional[torch.Tensor] = None,
) -> None:
    """Phase 2 for one group: the update from (possibly all-reduced) stats."""
    acc = accumulate_dtype(group.dtype)
    group.backend.apply(
        group.params,
        group.grads,
        stats,
        lr=_device_scalar(lr, group.device, acc),
        max_norms=group.max_norms,
        p_bound=p_bound,
        maximize=maximize,
        prefactor=prefactor,
        found_inf=None if found_inf is None else _device_scalar(found_inf, group.device),
        grad_scale=None if grad_scale is None else _device_scalar(grad_scale, group.device),
        sr_seed=None if sr_seed is None else sr_seed.to(group.device, non_blocking=True).reshape(()),
    )


def step_groups(
    groups: Sequence[Group],
    *,
    lr,
    p_bound: Optional[float] = None,
    maximize: bool = False,
    prefactor: bool = True,
    found_inf: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    reduce_stats: Optional[Callable[[torch.Tensor, Group], torch.Tensor]] = None,
    sr_seed: Optional[torch.Tensor] = None,
) -> None:
    """Both phases for groups made by :func:`plan`."""
    for group in groups:
        stats = run_stats(group, inner=p_bound is not None)
        if reduce_stats is not None:
            stats = reduce_stats(stats, group)
        run_apply(
            group, stats, lr=lr, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
            found_inf=found_inf, grad_scale=grad_scale, sr_seed=sr_seed,
        )


def fromage(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    max_norms: Optional[Sequence[torch.Tensor]],
    *,
    lr,
    p_bound: Optional[float] = None,
    maximize: bool = False,
    backend: Union[str, Backend] = "auto",
    prefactor: bool = True,
    found_inf: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    reduce_stats: Optional[Callable[[torch.Tensor, Group], torch.Tensor]] = None,
    sr_seed: Optional[torch.Tensor] = None,
) -> None:
    """One Fromage step over ``params`` in place (docs/design.md describes the step).

    ``max_norms``: with ``p_bound``, one float32 0-d tensor per parameter; a negative value means
    "not set yet" and is set from this step's pre-update norm. ``lr`` is a float or a 0-d tensor.
    ``prefactor=False`` drops the 1/sqrt(1+lr^2) factor (the paper's LARS baseline).
    ``found_inf``: a device flag; when non-zero the step changes nothing. ``grad_scale``: the
    factor the gradients carry (loss scaling); only the zero-norm fallback needs it.
    ``sr_seed``: a 0-d int64 tensor; when given, bf16 results are rounded stochastically.
    """
    check_lr(lr, read_tensor=False)
    check_p_bound(p_bound)
    groups = plan(params, grads, max_norms, backend=backend, p_bound=p_bound)
    step_groups(
        groups, lr=lr, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
        found_inf=found_inf, grad_scale=grad_scale, reduce_stats=reduce_stats, sr_seed=sr_seed,
    )
