"""What ``Fromage.load_state_dict`` accepts, checked before anything changes.

torch's loader replaces the param groups and the state first and would leave a bad value in place
for every later step to trip over (or, worse, to use: a NaN ``max_norm`` switches the bound off for
good). So every value Fromage reads is checked here first, with the same rules as construction
for the hyper-parameters; a load that raises has changed nothing.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Set, Tuple

import torch

from ._math import UNSET_MAX_NORM
from ._param_groups import check_weight_decay
from .functional import FLOAT32_MAX, check_flags, check_lr, check_p_bound

#: The reference implementation keeps the bound as ``state["max"]``, a Python float.
AUTHORS_MAX = "max"
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _one_value(value, what: str, *, integer: bool):
    """The number in ``value`` (a real number or a dense one-element tensor) as a Python int or
    float; ValueError for anything else."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.numel() != 1 or value.device.type == "meta":
            raise ValueError(f"{what} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)} ({value.layout}, {value.device.type})")
        if value.dtype == torch.bool or value.is_complex() or (integer and value.is_floating_point()):
            raise ValueError(f"{what} must be {'an integer' if integer else 'a real number'}, got a {value.dtype} tensor")
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


def max_norm_value(value, what: str) -> float:
    """A saved bound: finite, at least 0 and at most the largest float32 (it is float32 state), or
    the unset marker (-1)."""
    v = float(_one_value(value, what, integer=False))
    if not (v == UNSET_MAX_NORM or (math.isfinite(v) and 0 <= v <= FLOAT32_MAX)):
        raise ValueError(f"{what} is {v}: it must be a finite float32 >= 0, or {UNSET_MAX_NORM} (not set yet)")
    return v


def seed_value(value, what: str) -> int:
    v = _one_value(value, what, integer=True)
    if not _INT64[0] <= v <= _INT64[1]:
        raise ValueError(f"{what} is {v}: it must fit in int64")
    return v


def check(state_dict: Any, param_groups: List[Dict[str, Any]], defaults: Dict[str, Any],
          hyper_parameters: Tuple[str, ...]) -> Tuple[Dict[Any, Dict[str, object]], Set[Any]]:
    """Check ``state_dict`` against this optimizer's ``param_groups``; raise ValueError if it
    cannot be loaded. Returns ``(saved, converted)``: per saved parameter id, the values of its
    ``max_norm`` and ``sr_seed`` as Python numbers; and the ids whose bound came as the reference
    implementation's ``"max"``."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or \
            not isinstance(state_dict.get("param_groups"), (list, tuple)):
        raise ValueError("a Fromage state_dict is a dict with a 'state' dict and a 'param_groups' list")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(param_groups)}")
    ids = set()
    for i, (saved, own) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"parameter group {i} of the loaded state dict is not a dict with a 'params' list")
        if len(saved["params"]) != len(own["params"]):
            raise ValueError(f"parameter group {i} of the loaded state dict has {len(saved['params'])} parameters, "
                             f"this optimizer's has {len(own['params'])}")
        ids.update(saved["params"])
        values = {key: saved.get(key, defaults.get(key)) for key in hyper_parameters}
        try:
            check_lr(values["lr"])
            check_p_bound(values["p_bound"])
            check_weight_decay(values["weight_decay"])
            check_flags(**{k: v for k, v in values.items() if k not in ("lr", "p_bound", "weight_decay")})
        except ValueError as exc:
            raise ValueError(f"parameter group {i} of the loaded state dict: {exc}") from None
    saved_state: Dict[Any, Dict[str, object]] = {}
    converted: Set[Any] = set()
    for k, v in state_dict["state"].items():
        if k not in ids:
            continue  # (torch keeps it as it is; no parameter of this optimizer reads it)
        if not isinstance(v, dict):
            raise ValueError(f"the state of parameter {k} must be a dict, got {type(v).__name__}")
        entry: Dict[str, object] = {}
        if "max_norm" in v:
            entry["max_norm"] = max_norm_value(v["max_norm"], f"max_norm of parameter {k}")
        elif isinstance(v.get(AUTHORS_MAX), numbers.Real) and not isinstance(v[AUTHORS_MAX], bool):
            entry["max_norm"] = max_norm_value(v[AUTHORS_MAX], f"the bound ('max') of parameter {k}")
            converted.add(k)
        if "sr_seed" in v:
            entry["sr_seed"] = seed_value(v["sr_seed"], f"sr_seed of parameter {k}")
        saved_state[k] = entry
    return saved_state, converted
