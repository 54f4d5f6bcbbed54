"""The functional form of Fromage and its two passes.

``fromage(...)`` runs one step over any list of tensors. A caller that shards tensors (FSDP2,
DTensor) passes ``reduce_stats``: it receives each group's ``[n, 3]`` stats of the local shards
between the passes and returns the stats of the whole tensors (one all-reduce per group).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch

from ... import backends as _backends
from ...backends import Backend
from ...engine import execute as _execute
from ...engine.groups import Group, group_tensors
from ...engine.overlap import refuse_overlaps
from ...engine.spec import as_step_value, check_flag
from ...engine.spec import check_lr as _check_lr
from ...engine.spec import check_positive_or_none
from .coefficients import UNSET_MAX_NORM
from .rule import FROMAGE

__all__ = ["fromage", "check_lr", "check_p_bound", "check_flags", "Group", "plan", "run_stats", "run_apply",
           "step_groups", "UNSET_MAX_NORM"]


def check_lr(lr, *, read_tensor: bool = True) -> None:
    """ValueError unless lr is a finite real number >= 0 (at most the largest float32) or such a
    1-element dense floating-point tensor.

    ``read_tensor=False`` checks a tensor's layout, shape and dtype only: its value stays on the
    device (a step guards against a bad value there: see ``engine.spec.usable_lr``).
    """
    _check_lr("lr", lr, read_tensor)


def check_p_bound(p_bound) -> None:
    """ValueError unless p_bound is None or a finite real number > 0."""
    check_positive_or_none("p_bound", p_bound)


def check_flags(**flags) -> None:
    """ValueError unless each flag is True or False: bool("False") is True, so a string (or a
    number) would silently do the opposite of what it says."""
    for name, value in flags.items():
        check_flag(name, value)


def _fallback() -> Backend:
    return _backends.get(_backends.FALLBACK)


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
    groups = group_tensors(FROMAGE, params, grads, lambda device: _backends.resolved(name, device), _fallback,
                           scalars={"max_norm": max_norms} if p_bound is not None else None)
    if not torch.compiler.is_compiling():  # (fake tensors have no addresses)
        refuse_overlaps(params, grads, lambda i: f"parameter {i}")
    for group in groups:
        group.values = dict(FROMAGE.spec.defaults(), p_bound=as_step_value(p_bound))
    return groups


def run_stats(group: Group, *, inner: Optional[bool] = None) -> torch.Tensor:
    """Pass 1 for one group: ``[n, 3]`` stats of its tensors (as stored locally). ``<p, g>`` is
    computed when ``inner`` or the group has a p_bound (only the clamp reads it)."""
    return _execute.run_pass(group, 0, monitor=bool(inner))


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
    """Pass 2 for one group: the update from (possibly all-reduced) stats."""
    _set_hyper(group, lr, p_bound, maximize, prefactor, sr_seed)
    _execute.run_pass(group, 1, sums=stats, found_inf=found_inf, grad_scale=grad_scale)


def _set_hyper(group: Group, lr, p_bound, maximize, prefactor, sr_seed) -> None:
    if p_bound is not None and "max_norm" not in group.scalars:
        raise ValueError("p_bound is set but the group was planned without max_norm tensors")
    group.values = dict(lr=as_step_value(lr), p_bound=as_step_value(p_bound), maximize=maximize, prefactor=prefactor,
                        stochastic_rounding=sr_seed is not None)
    group.counters = {"sr_seed": sr_seed} if sr_seed is not None and group.dtype == torch.bfloat16 else {}


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
    """Both passes for groups made by :func:`plan`, with these hyper-parameters."""
    for group in groups:
        _set_hyper(group, lr, p_bound, maximize, prefactor, sr_seed)
    _execute.execute(groups, found_inf=found_inf, grad_scale=grad_scale, reduce_sums=reduce_stats)


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
