"""A rule's hyper-parameters as one spec: names, defaults, validation, and what each one is.

Four kinds of entry:

- :func:`value`: a number read from the param group at every step (schedulers change ``lr``,
  ``momentum``, ``betas``); it may also be a 0-d tensor where the spec allows it (``lr``), whose
  value then stays on the device. A change never rebuilds the step plan.
- :func:`option`: a number (or None) the plan is built for (``p_bound``: its presence decides
  what state exists); a change rebuilds the plan.
- :func:`flag`: a bool the plan is built for; it has a bit in the flags the kernels receive.
- :func:`setting`: a structural entry the kernels never see as such (``stochastic_rounding``,
  which gives a group a seed).

Values and options reach every backend packed into **one** small tensor on the group's device, in
the spec's order and the group's accumulation dtype (:meth:`Spec.pack`); flags as one ``int``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["Hyper", "Spec", "value", "option", "flag", "setting", "check_lr", "check_flag",
           "check_finite", "check_non_negative", "check_positive_or_none"]

Check = Callable[[str, Any, bool], None]


class Hyper:
    """One entry of a :class:`Spec` (made by :func:`value`, :func:`option`, :func:`flag`, :func:`setting`)."""

    __slots__ = ("name", "default", "check", "kind", "width", "tensor")

    def __init__(self, name: str, default, check: Check, kind: str, width: int = 1, tensor: bool = False):
        self.name, self.default, self.check, self.kind = name, default, check, kind
        self.width, self.tensor = width, tensor

    @property
    def structural(self) -> bool:
        return self.kind != "value"

    @property
    def packed(self) -> bool:
        return self.kind in ("value", "option")

    def __repr__(self) -> str:
        return f"{self.kind}({self.name!r}, {self.default!r})"


def value(name: str, default, check: Check, *, width: int = 1, tensor: bool = False) -> Hyper:
    """A per-step number (``width`` numbers for a tuple such as ``betas``); ``tensor``: a 0-d
    floating tensor is accepted too, and stays on the device."""
    return Hyper(name, default, check, "value", width, tensor)


def option(name: str, default, check: Check) -> Hyper:
    """A structural number or None (packed as 0.0)."""
    return Hyper(name, default, check, "option")


def flag(name: str, default: bool) -> Hyper:
    return Hyper(name, default, check_flag, "flag")


def setting(name: str, default, check: Check) -> Hyper:
    return Hyper(name, default, check, "setting")


# -- checks shared by rules -------------------------------------------------------------------------

#: The largest float32: a step holds lr as a float32 tensor (float64 for float64 groups).
FLOAT32_MAX = 3.4028234663852886e38


def usable_lr(lr: torch.Tensor) -> torch.Tensor:
    """Whether a tensor lr can be stepped with (>= 0 and finite in float32; False for NaN), on its
    device. A tensor lr edited after construction is never read on the host: a step whose lr is not
    usable leaves every parameter and its state as they were, as a found_inf step does."""
    return (lr >= 0) & (lr <= FLOAT32_MAX)


def applied(found_inf: Optional[torch.Tensor], lr, device: torch.device) -> Optional[torch.Tensor]:
    """Whether a step is applied, as a 0-d bool tensor on ``device`` (None: always): not when
    ``found_inf`` is non-zero, nor when a tensor ``lr`` is not usable."""
    keep = None
    if isinstance(lr, torch.Tensor):
        keep = usable_lr(lr.to(device, non_blocking=True)).reshape(())
    if found_inf is not None:
        no_inf = (found_inf.to(device, non_blocking=True) == 0).reshape(())
        keep = no_inf if keep is None else keep & no_inf
    return keep


def real(value) -> Optional[float]:
    """``float(value)`` for a real number (not a bool), inf where that overflows (``10**400``);
    None for anything else. Steps use this float, so that any real type the checks accept
    (``Fraction``, numpy scalars of any width) is one the step can use."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def as_step_value(value):
    """A checked hyper-parameter as a step uses it: a real number (not a bool) becomes a float;
    anything else (None, a flag, a tensor, a tuple) stays as it is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return float(value)


def check_lr(name: str, lr, read_tensor: bool = True) -> None:
    """ValueError unless lr is a finite real number >= 0 (at most the largest float32) or such a
    1-element dense floating-point tensor.

    ``read_tensor=False`` checks a tensor's layout, shape and dtype only: its value stays on the
    device (a step guards against a bad value there: see :func:`usable_lr`).
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
        value = real(lr)
        if value is None:
            # A string or a bool would convert silently to a float; refuse them.
            raise ValueError(f"lr must be a number or a 1-element tensor, got {lr!r}")
    if not math.isfinite(value) or value < 0 or value > FLOAT32_MAX:
        raise ValueError(f"invalid learning rate: {lr} (must be finite, >= 0 and at most {FLOAT32_MAX:.6g})")


def check_finite(name: str, x, read_tensor: bool = True) -> None:
    """ValueError unless ``x`` is a finite real number."""
    value = real(x)
    if value is None or not math.isfinite(value):
        raise ValueError(f"invalid {name}: {x!r} (must be a finite number)")


def check_non_negative(name: str, x, read_tensor: bool = True) -> None:
    """ValueError unless ``x`` is a finite real number >= 0."""
    value = real(x)
    if value is None or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {name}: {x!r} (must be a finite number and >= 0.0)")


def check_positive_or_none(name: str, x, read_tensor: bool = True) -> None:
    """ValueError unless ``x`` is None or a finite real number > 0."""
    if x is None:
        return
    value = real(x)
    if value is None or not math.isfinite(value) or not value > 0:
        raise ValueError(f"invalid {name}: {x!r} (must be None or a finite number > 0)")


def check_flag(name: str, x, read_tensor: bool = True) -> None:
    """ValueError unless ``x`` is True or False: bool("False") is True, so a string (or a number)
    would silently do the opposite of what it says."""
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be True or False, got {x!r}")


def _constants(flat, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu" or not flat:
        return torch.tensor(flat, dtype=dtype, device=device)
    # Fills, not a host-to-device copy: this may run during CUDA-graph capture, which refuses
    # pageable copies (and would bake in their source).
    return torch.stack([torch.full((), x, dtype=dtype, device=device) for x in flat])


class Spec:
    """The hyper-parameters of a rule, in order."""

    def __init__(self, *entries: Hyper):
        self.entries: Tuple[Hyper, ...] = entries
        self.by_name: Dict[str, Hyper] = {e.name: e for e in entries}
        if len(self.by_name) != len(entries):
            raise ValueError("hyper-parameter names must be unique")
        self.names = tuple(e.name for e in entries)
        self.structural = tuple(e.name for e in entries if e.structural)
        self.per_step = tuple(e.name for e in entries if not e.structural)
        #: names of the packed entries, in the order of the packed tensor (a tuple entry takes ``width`` slots)
        self.packed = tuple(e.name for e in entries if e.packed)
        self.slots: Dict[str, int] = {}
        slot = 0
        for e in entries:
            if e.packed:
                self.slots[e.name] = slot
                slot += e.width
        self.size = slot
        self.bits: Dict[str, int] = {}
        for e in entries:
            if e.kind == "flag":
                self.bits[e.name] = 1 << len(self.bits)
        self._tensor_ok = frozenset(e.name for e in entries if e.tensor)

    def defaults(self) -> Dict[str, Any]:
        return {e.name: e.default for e in self.entries}

    def check(self, values: Mapping[str, Any], names: Optional[Sequence[str]] = None, *,
              read_tensor: bool = True) -> None:
        """ValueError for the first entry of ``values`` (those of ``names``, default all) that is invalid."""
        for name in self.names if names is None else names:
            if name in values:
                self.by_name[name].check(name, values[name], read_tensor)

    def structure(self, values: Mapping[str, Any]) -> Tuple:
        """The structural entries, typed: a value that compares equal but means something else
        (True for 1.0) rebuilds the plan."""
        return tuple((type(values[k]), values[k]) for k in self.structural)

    def flags(self, values: Mapping[str, Any]) -> int:
        out = 0
        for name, bit in self.bits.items():
            if values[name]:
                out |= bit
        return out

    def pack(self, values: Mapping[str, Any], device: torch.device, dtype: torch.dtype, cache: dict) -> torch.Tensor:
        """The packed entries as one ``[size]`` tensor of ``dtype`` on ``device`` (None as 0).

        While every entry is a Python number and they are the numbers of the last call (``cache``
        holds them), the tensor of the last call (no host-to-device copy). A tensor entry is read on
        the device: the result is then a new tensor that holds its current value (a captured graph
        re-reads it).
        """
        flat = []
        tensors = False
        for name in self.packed:
            v = values[name]
            if isinstance(v, (tuple, list)):
                flat.extend(v)
                tensors = tensors or any(isinstance(x, torch.Tensor) for x in v)
            else:
                flat.append(0.0 if v is None else v)
                tensors = tensors or isinstance(v, torch.Tensor)
        if not tensors:
            key = tuple((type(x), x) for x in flat)
            if cache.get("key") != key:
                cache["tensor"] = _constants(flat, dtype, device)
                cache["key"] = key
            return cache["tensor"]
        # Numbers from a cached tensor of the numbers (tensor slots hold 0 there), tensors as they are.
        numbers_only = [0.0 if isinstance(x, torch.Tensor) else x for x in flat]
        key = tuple((type(x), x) for x in numbers_only)
        if cache.get("key") != key:
            cache["tensor"] = _constants(numbers_only, dtype, device)
            cache["key"] = key
        base = cache["tensor"]
        parts = [x.to(device=device, dtype=dtype, non_blocking=True).reshape(()) if isinstance(x, torch.Tensor)
                 else base[i] for i, x in enumerate(flat)]
        return torch.stack(parts)

    def tensor_allowed(self, name: str) -> bool:
        return name in self._tensor_ok
