"""The functional form of Fromage and its two phases.

``fromage(...)`` runs one step over any list of tensors. A caller that shards tensors (FSDP2,
DTensor) passes ``reduce_stats``: it receives each group's ``[n, 3]`` stats of the local shards
between the phases and returns the stats of the whole tensors (one all-reduce per group).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import backends as _backends
from ._groups import FALLBACK, Group, execute, group_tensors, run_apply as _run_apply, run_stats as _run_stats
from ._math import FLOAT32_MAX, UNSET_MAX_NORM
from ._overlap import refuse_overlaps
from .backends import Backend

__all__ = ["fromage", "check_lr", "check_p_bound", "check_flags", "Group", "plan", "run_stats", "run_apply", "step_groups", "UNSET_MAX_NORM"]

def _real(value) -> Optional[float]:
    """``float(value)`` for a real number (not a bool), inf where that overflows (``10**400``);
    None for anything else. Steps use this float, so that any real type the checks accept
    (``Fraction``, numpy scalars of any width) is one the step can use."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_lr(lr, *, read_tensor: bool = True) -> None:
    """ValueError unless lr is a finite real number >= 0 (at most the largest float32) or such a
    1-element dense floating-point tensor.

    ``read_tensor=False`` checks a tensor's layout, shape and dtype only: its value stays on the
    device (a step guards against a bad value there: see ``_math.usable_lr``).
    """
    if isinstance(lr, torch.Tensor):
        if lr.layout != torch.strided:
            raise ValueError(f"a tensor lr must be dense (strided), got a {lr.layout} tensor")
        if lr.numel() != 1:
            raise ValueError(f"a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise ValueError(f"a tensor lr must be floating point, got {lr.dtype}")
        if lr.device.type == "meta":
            raise ValueError("a tensor lr must hold a value; got a meta tensor")
        if not read_tensor:
            return
        value = float(lr.detach().cpu())  # at construction only: a step never reads it
    else:
        value = _real(lr)
        if value is None:
            # A string or a bool would convert silently to a float; refuse them.
            raise ValueError(f"lr must be a number or a 1-element tensor, got {lr!r}")
    if not math.isfinite(value) or value < 0 or value > FLOAT32_MAX:
        raise ValueError(f"invalid learning rate: {lr} (must be finite, >= 0 and at most {FLOAT32_MAX:.6g})")


def check_p_bound(p_bound) -> None:
    """ValueError unless p_bound is None or a finite real number > 0."""
    if p_bound is None:
        return
    value = _real(p_bound)
    if value is None or not math.isfinite(value) or not value > 0:
        raise ValueError(f"invalid p_bound: {p_bound!r} (must be None or a finite number > 0)")


def as_float(value) -> Optional[float]:
    """A checked hyper-parameter as the step uses it: None stays None, a number becomes a float."""
    return None if value is None else float(value)


def check_flags(**flags) -> None:
    """ValueError unless each flag is True or False: bool("False") is True, so a string (or a
    number) would silently do the opposite of what it says."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")



_resolved: Dict[Tuple[str, torch.device], Backend] = {}


def _backend_for(name: Union[str, Backend], device: torch.device) -> Backend:
    """The backend for ``name`` on ``device``, resolved once per (name, device) and process: the
    registry's lookups (environment, ranking, availability) give the same answer every call."""
    if isinstance(name, Backend):
        return name
    name = _backends.requested_name(name)
    key = (name, device)
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _backends.resolve(name, device)
    return backend


def _fallback() -> Backend:
    return _backends.get(FALLBACK)


def plan(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    max_norms: Optional[Sequence[torch.Tensor]],
    *,
    backend: Union[str, Backend] = "auto",
    p_bound: Optional[float] = None,
) -> List[Group]:
    """Validate every input and group the tensors by (device, dtype); modify nothing.

    Raises before any tensor is touched, so a bad step leaves the parameters as they were. The
    groups carry ``p_bound`` and the default hyper-parameters; :func:`step_groups` sets the rest.
    """
    if len(params) != len(grads):
        raise ValueError(f"got {len(params)} parameters but {len(grads)} gradients")
    if max_norms is not None and len(max_norms) != len(params):
        raise ValueError(f"got {len(params)} parameters but {len(max_norms)} max_norm tensors")
    if p_bound is not None and max_norms is None:
        raise ValueError("p_bound is set: pass one max_norm tensor per parameter")
    name = backend
    groups = group_tensors(params, grads, max_norms if p_bound is not None else None,
                           lambda device: _backend_for(name, device), _fallback)
    if not torch.compiler.is_compiling():  # (fake tensors have no addresses)
        refuse_overlaps(params, grads, lambda i: f"parameter {i}")
    for group in groups:
        group.p_bound = as_float(p_bound)
    return groups


def run_stats(group: Group, *, inner: Optional[bool] = None) -> torch.Tensor:
    """Phase 1 for one group: ``[n, 3]`` stats of its tensors (as stored locally)."""
    return _run_stats(group, inner=inner)


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
    _set_hyper(group, lr, p_bound, maximize, prefactor, sr_seed)
    _run_apply(group, stats, found_inf=found_inf, grad_scale=grad_scale)


def _set_hyper(group: Group, lr, p_bound, maximize, prefactor, sr_seed) -> None:
    if p_bound is not None and group.max_norms is None:
        raise ValueError("p_bound is set but the group was planned without max_norm tensors")
    group.lr, group.p_bound, group.maximize, group.prefactor = lr, as_float(p_bound), maximize, prefactor
    group.sr_seed = sr_seed if group.dtype == torch.bfloat16 else None


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
    """Both phases for groups made by :func:`plan`, with these hyper-parameters."""
    for group in groups:
        _set_hyper(group, lr, p_bound, maximize, prefactor, sr_seed)
    execute(groups, found_inf=found_inf, grad_scale=grad_scale, reduce_stats=reduce_stats)


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
    """One Fromage step over ``params`` in place (see docs/fromage.md, "Exact semantics").

    ``max_norms``: with ``p_bound``, one float32 0-d tensor per parameter; a negative value means
    "not set yet" and is set from this step's pre-update norm. ``lr`` is a float or a 0-d tensor.
    ``prefactor=False`` drops the 1/sqrt(1+lr^2) factor (the paper's LARS baseline).
    ``found_inf``: a device flag; when non-zero the step changes nothing. ``grad_scale``: the
    factor the gradients carry (loss scaling); only the zero-norm fallback needs it.
    ``sr_seed``: a 0-d int64 tensor; when given, bf16 results are rounded stochastically.
    Everything is validated before any tensor changes.
    """
    check_lr(lr, read_tensor=False)
    check_p_bound(p_bound)
    check_flags(maximize=maximize, prefactor=prefactor)
    groups = plan(params, grads, max_norms, backend=backend, p_bound=p_bound)
    step_groups(
        groups, lr=lr, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
        found_inf=found_inf, grad_scale=grad_scale, reduce_stats=reduce_stats, sr_seed=sr_seed,
    )
