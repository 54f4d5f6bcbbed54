"""The life of a rule's state: where each kind is created, found, moved and laid out.

State is created in two places only: per-tensor scalars when a parameter joins a param group
that needs them (:func:`create_tensor_scalars`: unset views of one tensor per device, so that
checkpoint tools find state and never run a state-creating step), and everything else when a
step plan is built (:func:`tensor_scalar`, :func:`buffer`, :func:`group_scalar`), through a
:class:`Pending` that stores new or moved tensors only once the whole build has validated. Inside
CUDA-graph capture no state is created (a replay would reset it).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import capture
from .dtypes import buffer_dtype
from .rule import Buffer, GroupScalar, TensorScalar

__all__ = ["Pending", "local_device", "create_tensor_scalars", "tensor_scalar", "buffer", "group_scalar",
           "group_kept_scalar"]


def local_device(p: torch.Tensor) -> torch.device:
    """Where ``p``'s values live: a DTensor's local shard may sit elsewhere than its mesh (CPU offload)."""
    local = getattr(p, "_local_tensor", None)
    return (local if isinstance(local, torch.Tensor) else p).device


class Pending:
    """State a build creates or moves, stored only once the whole build has validated. (A build
    asks for each state entry once: a parameter belongs to one group, a per-group scalar to one
    group and device.)"""

    def __init__(self, state):
        self.state = state
        self.items: List[Tuple[torch.Tensor, str, torch.Tensor]] = []
        self.group_items: List[Tuple[dict, str, torch.Tensor]] = []

    def get(self, p: torch.Tensor, key: str):
        if p not in self.state:
            return None
        return self.state[p].get(key)

    def put(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
        self.items.append((p, key, value))
        return value

    def put_group(self, pg: dict, key: str, value: torch.Tensor) -> torch.Tensor:
        self.group_items.append((pg, key, value))
        return value

    def commit(self) -> None:
        for p, key, value in self.items:
            self.state[p][key] = value
        for pg, key, value in self.group_items:
            pg[key] = value


def create_tensor_scalars(state, params: Sequence[torch.Tensor], specs: Sequence[TensorScalar], title: str) -> None:
    """The per-tensor scalar state of parameters joining a param group: new entries are views of one
    tensor per device, in parameter order, holding the unset value (what a step hands its backend
    as one argument when the group steps as one); existing ones stay, moved to the parameter's device."""
    for spec in specs:
        new: Dict[torch.device, List[torch.Tensor]] = {}
        for p in params:
            if state.get(p, {}).get(spec.name) is None:
                new.setdefault(local_device(p), []).append(p)
            else:
                state[p][spec.name] = tensor_scalar(state, p, spec, local_device(p), None, title)
        for device, members in new.items():
            capture.refuse_new_state(spec.name, device, title)
            laid = torch.full((len(members),), spec.unset, dtype=spec.dtype, device=device)
            for p, view in zip(members, laid.unbind()):
                state[p][spec.name] = view


def tensor_scalar(state, p: torch.Tensor, spec: TensorScalar, device: torch.device, pending: Optional[Pending],
                  title: str) -> torch.Tensor:
    """The per-tensor scalar state of ``p`` on ``device`` (its local shard's for a DTensor). Created
    unset without reading any value (the step sets it); one that stayed behind when the model
    moved is moved. With ``pending``, a new or moved tensor is stored there."""
    current = pending.get(p, spec.name) if pending is not None else state.get(p, {}).get(spec.name)
    if current is not None and current.device == device:
        return current
    if current is None:
        capture.refuse_new_state(spec.name, device, title)
        value = torch.full((), spec.unset, dtype=spec.dtype, device=device)
    else:  # created before the model moved (.to(device))
        value = current.to(device)
    return value if pending is None else pending.put(p, spec.name, value)


def buffer(p: torch.Tensor, spec: Buffer, pending: Pending, title: str) -> torch.Tensor:
    """The elementwise state ``spec`` of ``p``: zeros when new (of ``p``'s shape, contiguous, in the
    buffer dtype; a DTensor like ``p``), moved to ``p``'s device when it stayed behind."""
    current = pending.get(p, spec.name)
    if current is not None and current.device == p.device:
        return current
    if current is None:
        capture.refuse_new_state(spec.name, local_device(p), title)
        value = torch.zeros_like(p, dtype=buffer_dtype(p.dtype), memory_format=torch.contiguous_format)
    else:
        value = current.to(p.device)
    return pending.put(p, spec.name, value)


def group_scalar(opt, params: Sequence[torch.Tensor], spec: GroupScalar, index: int, device: torch.device,
                 pending: Pending, title: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(anchor, value)``: the per-group scalar of param group ``index`` on ``device``, kept in the
    state of the group's first parameter there for which ``spec.anchor`` holds (a fixed place,
    whichever parameters have gradients this step), on that device (moved with it)."""
    anchor = next(p for p in params if spec.anchor(p) and local_device(p) == device)
    current = pending.get(anchor, spec.name)
    if current is not None and current.device == device:
        return anchor, current
    if current is None:
        capture.refuse_new_state(spec.name, device, title)
        value = torch.full((), spec.initial(opt, index, device), dtype=spec.dtype, device=device)
    else:
        value = current.to(device)
    return anchor, pending.put(anchor, spec.name, value)


def group_kept_scalar(opt, pg: dict, spec: GroupScalar, index: int, pending: Pending,
                      title: str) -> Optional[torch.Tensor]:
    """The per-group scalar ``spec`` kept in param group ``pg`` (``where="group"``): a 0-d tensor
    on the device of the group's first parameter, made from what the group holds (a number, a
    tensor elsewhere: a checkpoint of another implementation) or its initial value. None for a
    group without parameters."""
    params = pg["params"]
    if not params:
        return None
    device = local_device(params[0])
    current = pg.get(spec.name)
    if isinstance(current, torch.Tensor) and current.device == device and current.dtype == spec.dtype \
            and current.dim() == 0:
        return current
    capture.refuse_new_state(spec.name, device, title)
    if current is None:
        value = torch.full((), spec.initial(opt, index, device), dtype=spec.dtype, device=device)
    else:
        value = torch.as_tensor(current).detach().to(device=device, dtype=spec.dtype).reshape(()).clone()
    return pending.put_group(pg, spec.name, value)
