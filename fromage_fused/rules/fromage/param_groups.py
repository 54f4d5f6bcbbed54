"""Param groups that fit Fromage, and the warnings for two traps a param group can hold.

- ``p_bound`` fixes each tensor's bound at its first step to ``p_bound * ||p||``: a tensor that is
  all zeros then (a zero-initialised bias) is clamped back to norm 0 after every step, so it never
  moves. :func:`param_groups` keeps such tensors, and 1-D ones, out of the bounded group.
- Fromage has no weight decay, but training frameworks put a ``weight_decay`` key in the groups
  they build (and pass ``weight_decay=`` to the constructor): it is accepted, checked and saved,
  and ignored with a warning when it is not zero.

The checks here read tensor values on the host: they run at construction and ``add_param_group``
only, never in ``step()``.
"""
from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ...engine import capture

__all__ = ["param_groups", "check_weight_decay", "warn_traps"]

#: How many parameter names a warning lists before it says "and N more".
_NAMES_SHOWN = 8


def param_groups(model_or_named_params: Union[nn.Module, Iterable], p_bound: Optional[float], *,
                 unbounded: Sequence[str] = (), **options: Any) -> List[Dict[str, Any]]:
    """Two param groups for ``Fromage``: one with ``p_bound``, one without.

    The group without the bound gets every tensor that would be frozen or hampered by it:

    - tensors of fewer than two dimensions (biases, the weights of norm layers, scalars): often
      initialised to zero or one, and small beside their layer's weight;
    - tensors that are all zeros now (their bound would be 0: they would stay zero for ever);
    - tensors whose name matches one of ``unbounded`` (exact names or ``fnmatch`` patterns such as
      ``"*.pos_embed"``).

    Parameters that do not require a gradient are left out, as ``timm``'s
    ``param_groups_weight_decay`` does.

    Args:
        model_or_named_params: a module, or ``(name, tensor)`` pairs as ``model.named_parameters()``
            yields them, or bare tensors (named by their position).
        p_bound: the bound of the first group (``None`` makes both groups unbounded).
        unbounded: names or patterns of further tensors to leave unbounded.
        **options: other hyper-parameters for both groups (``lr=...``, ``maximize=...``).

    Returns:
        ``[{"params": bounded, "p_bound": p_bound, **options}, {"params": rest, "p_bound": None,
        **options}]``; either list may be empty. Pass it as ``Fromage``'s first argument.

    Reads every tensor's values once (to find the all-zero ones): call it before training, not
    inside a step.
    """
    if isinstance(unbounded, str):
        unbounded = (unbounded,)
    named = _named(model_or_named_params)
    bounded, rest = [], []
    zero = _all_zero([p for _, p in named])
    for (name, p), is_zero in zip(named, zero):
        leave_out = p.dim() < 2 or is_zero or any(fnmatch.fnmatchcase(name, pattern) for pattern in unbounded)
        (rest if leave_out else bounded).append(p)
    return [dict(params=bounded, p_bound=p_bound, **options), dict(params=rest, p_bound=None, **options)]


def _named(source) -> List[Tuple[str, torch.Tensor]]:
    items = source.named_parameters() if isinstance(source, nn.Module) else source
    if isinstance(items, torch.Tensor):
        items = [items]
    named = []
    for i, item in enumerate(items):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        elif isinstance(item, torch.Tensor):
            name, p = str(i), item
        else:
            raise TypeError("param_groups takes a module, (name, tensor) pairs or tensors; "
                            f"got an element of type {type(item).__name__}")
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"param_groups: {name!r} is not a tensor but {type(p).__name__}")
        if p.requires_grad:
            named.append((name, p))
    return named


def check_weight_decay(weight_decay) -> None:
    """ValueError unless weight_decay is a finite number >= 0 (the key is accepted, not used)."""
    if (isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real)
            or not math.isfinite(weight_decay) or weight_decay < 0):
        raise ValueError(f"invalid weight_decay: {weight_decay!r} (must be a finite number >= 0; "
                         "Fromage has none and ignores a non-zero value with a warning)")


def warn_traps(optimizer, group_indices: Iterable[int], stacklevel: int) -> None:
    """One warning for the given groups of ``optimizer`` that carry a non-zero ``weight_decay``,
    and one for the all-zero tensors among their ``p_bound`` groups' parameters."""
    groups = [(i, optimizer.param_groups[i]) for i in group_indices]
    decayed = [(i, g) for i, g in groups if g.get("weight_decay", 0) != 0]
    if decayed:
        described = "; ".join(f"param group {i} (weight_decay={g['weight_decay']}, "
                              f"{_names(g, range(len(g['params'])))})"
                              for i, g in decayed)
        warnings.warn(
            f"Fromage has no weight decay: the weight_decay of {described} is ignored. Fromage's "
            "1/sqrt(1+lr^2) prefactor already shrinks every tensor by a factor of about 1 - lr^2/2 "
            "per step (a decay tied to lr), and p_bound caps each tensor's norm; pass "
            "weight_decay=0 (or leave it out) to silence this warning.", UserWarning, stacklevel=stacklevel)
    frozen = []
    for i, g in groups:
        if g.get("p_bound") is None or _no_host_reads(g["params"]):
            continue
        zero = [j for j, z in enumerate(_all_zero(g["params"])) if z]
        if zero:
            frozen.append(f"param group {i}: {_names(g, zero)}")
    if frozen:
        warnings.warn(
            f"p_bound sets each tensor's bound from its norm at its first step, and these tensors are "
            f"all zeros, so they will stay zero for ever: {'; '.join(frozen)}. Put them in a group "
            "without p_bound: fromage_fused.param_groups(model, p_bound=...) does that (it also leaves "
            "out biases and other 1-D tensors).", UserWarning, stacklevel=stacklevel)


def _names(group: Dict[str, Any], indices) -> str:
    indices = list(indices)
    names = group.get("param_names")
    shown = [repr(names[j]) if names is not None else f"params[{j}] {tuple(group['params'][j].shape)}"
             for j in indices[:_NAMES_SHOWN]]
    more = len(indices) - len(shown)
    count = f"{len(indices)} parameter{'s' if len(indices) != 1 else ''}: "
    return count + ", ".join(shown) + (f" and {more} more" if more else "")


def _no_host_reads(params) -> bool:
    """Values cannot be read here: tracing, CUDA-graph capture, or no values at all (meta)."""
    if torch.compiler.is_compiling():
        return True
    devices = {p.device for p in params}
    if any(d.type == "meta" for d in devices):
        return True
    return any(capture.capturing(d) for d in devices)


def _all_zero(params: Sequence[torch.Tensor]) -> List[bool]:
    """Whether each tensor holds only zeros: one host read per device, and for DTensors one
    collective per mesh (all ranks construct the optimizer with the same groups)."""
    counts: List[Optional[torch.Tensor]] = [None] * len(params)
    by_key: Dict[Any, List[int]] = {}
    for j, p in enumerate(params):
        local = getattr(p, "_local_tensor", None)
        t = (local if isinstance(local, torch.Tensor) else p).detach()
        if t.device.type == "meta" or p.numel() == 0:
            continue  # no values (deferred initialisation, an empty tensor): nothing to freeze
        if t.is_complex():
            t = torch.view_as_real(t)
        counts[j] = torch.count_nonzero(t)
        mesh = getattr(p, "device_mesh", None) if local is not None else None
        by_key.setdefault((t.device, mesh), []).append(j)
    zero = [False] * len(params)
    for (device, mesh), indices in by_key.items():
        stacked = torch.stack([counts[j] for j in indices])
        if mesh is not None:
            from torch.distributed.tensor import DTensor, Partial

            try:
                stacked = DTensor.from_local(stacked, mesh, [Partial()] * mesh.ndim, run_check=False).full_tensor()
            except Exception:  # a layout this check cannot sum (the same on every rank): no warning
                continue
        for j, count in zip(indices, stacked.tolist()):
            zero[j] = count == 0
    return zero
