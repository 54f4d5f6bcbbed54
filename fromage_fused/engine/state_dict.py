"""What an engine optimizer's ``load_state_dict`` accepts, checked before anything changes.

torch's loader replaces the param groups and the state first and would leave a bad value in place
for every later step to trip over (or, worse, to use: a NaN bound switches a clamp off for good).
So every value the rule reads is checked here first, with the rule's spec for the hyper-parameters
(the checks of construction) and the rule's state declarations for the per-parameter state; a
load that raises has changed nothing.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Tuple

import torch

from .rule import Buffer, GroupScalar, Rule, TensorScalar
from .spec import FLOAT32_MAX

_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _one_value(value, what: str, *, integer: bool):
    """The number in ``value`` (a real number or a dense one-element tensor) as a Python int or
    float; ValueError for anything else."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.numel() != 1 or value.device.type == "meta":
            raise ValueError(f"{what} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)} ({value.layout}, {value.device.type})")
        if value.dtype == torch.bool or value.is_complex() or (integer and value.is_floating_point()):
            kind = "an integer" if integer else "a real number"
            raise ValueError(f"{what} must be {kind}, got a {value.dtype} tensor")
        return value.detach().reshape(()).item()
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{what} must be an integer, got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def scalar_value(spec: TensorScalar, value, what: str) -> float:
    """A saved per-tensor scalar: finite, at least 0 and at most the largest float32 (it is float32
    state), or the unset marker."""
    v = float(_one_value(value, what, integer=False))
    if not (v == spec.unset or (math.isfinite(v) and 0 <= v <= FLOAT32_MAX)):
        raise ValueError(f"{what} is {v}: it must be a finite float32 >= 0, or {spec.unset} (not set yet)")
    return v


def counter_value(spec: GroupScalar, value, what: str) -> int:
    v = _one_value(value, what, integer=True)
    if not _INT64[0] <= v <= _INT64[1]:
        raise ValueError(f"{what} is {v}: it must fit in int64")
    return v


def check(rule: Rule, state_dict: Any, param_groups: List[Dict[str, Any]], defaults: Dict[str, Any]
          ) -> Tuple[Dict[Any, Dict[str, object]], Dict[Any, Tuple[str, ...]]]:
    """Check ``state_dict`` against an optimizer of ``rule`` whose groups are ``param_groups``; raise
    ValueError if it cannot be loaded. Returns ``(saved, dropped)``: per saved parameter id, the
    values of its state that the rule fixes the dtype of (Python numbers) and its buffers, after
    the rule's conversion of another implementation's state; and the keys a conversion replaced."""
    title = rule.title
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or \
            not isinstance(state_dict.get("param_groups"), (list, tuple)):
        raise ValueError(f"a {title} state_dict is a dict with a 'state' dict and a 'param_groups' list")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                         f"{len(param_groups)}")
    ids = set()
    spec = rule.spec
    checked = []
    for i, (saved, own) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"parameter group {i} of the loaded state dict is not a dict with a 'params' list")
        if len(saved["params"]) != len(own["params"]):
            raise ValueError(f"parameter group {i} of the loaded state dict has {len(saved['params'])} parameters, "
                             f"this optimizer's has {len(own['params'])}")
        ids.update(saved["params"])
        values = {key: saved.get(key, defaults.get(key)) for key in spec.names}
        try:
            spec.check(values)
        except ValueError as exc:
            raise ValueError(f"parameter group {i} of the loaded state dict: {exc}") from None
        checked.append(values)
    try:
        rule.check_groups(checked)
    except ValueError as exc:
        raise ValueError(f"the param groups of the loaded state dict: {exc}") from None
    scalars = {s.name: s for s in rule.state if isinstance(s, TensorScalar)}
    counters = {s.name: s for s in rule.group_scalars() if s.where == "state"}
    buffers = [b.name for b in rule.state if isinstance(b, Buffer)]
    saved_state: Dict[Any, Dict[str, object]] = {}
    dropped: Dict[Any, Tuple[str, ...]] = {}
    for k, v in state_dict["state"].items():
        if k not in ids:
            continue  # (torch keeps it as it is; no parameter of this optimizer reads it)
        if not isinstance(v, dict):
            raise ValueError(f"the state of parameter {k} must be a dict, got {type(v).__name__}")
        entry: Dict[str, object] = {}
        converted, replaced = rule.convert_loaded(v)
        for name, s in scalars.items():
            if name in v:
                entry[name] = scalar_value(s, v[name], f"{name} of parameter {k}")
            elif name in converted:
                entry[name] = scalar_value(s, converted[name], f"{name} of parameter {k} (as {', '.join(replaced)})")
        if converted:
            dropped[k] = replaced
        for name, s in counters.items():
            if name in v:
                entry[name] = counter_value(s, v[name], f"{name} of parameter {k}")
        for name in buffers:
            if name in v:
                entry[name] = v[name]
        saved_state[k] = entry
    return saved_state, dropped
