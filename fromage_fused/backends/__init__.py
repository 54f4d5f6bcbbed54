"""Backend registry: which backends exist, which work here, and which one ``auto`` picks.

A backend joins by adding one module to this package that defines ``BACKEND``, an instance of
:class:`~fromage_fused.backends._base.Backend`. ``auto`` tries them by descending ``priority``;
the environment variable ``FROMAGE_FUSED_BACKEND`` replaces ``auto`` with a named backend.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import warnings
from functools import lru_cache
from typing import Dict, List, Union

import torch

from ._base import Backend, BackendUnavailable

ENV_VAR = "FROMAGE_FUSED_BACKEND"
AUTO = "auto"

__all__ = ["Backend", "BackendUnavailable", "available_backends", "backend_names", "get", "resolve", "ENV_VAR"]


@lru_cache(maxsize=None)
def _registry() -> Dict[str, Backend]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        backend = getattr(module, "BACKEND", None)
        if isinstance(backend, Backend):
            found[backend.name] = backend
    return dict(sorted(found.items(), key=lambda kv: -kv[1].priority))


def _ranked(device: torch.device) -> List[Backend]:
    return sorted(_registry().values(), key=lambda b: -b.priority_on(device))


def backend_names() -> List[str]:
    """Every backend this installation knows, fastest first (whether or not it works here)."""
    return list(_registry())


def get(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` naming the choices for an unknown name."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown backend {name!r}; choose one of {[AUTO] + list(registry)}")
    return registry[name]


def _device(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


_warned = set()


def _usable(backend: Backend, device: torch.device, *, warn: bool) -> bool:
    try:
        return backend.unavailable_reason(device) is None
    except BackendUnavailable as exc:
        if warn and (backend.name, device.type) not in _warned:
            _warned.add((backend.name, device.type))
            warnings.warn(f"fromage_fused: backend {backend.name!r} failed to load, falling back: {exc}", RuntimeWarning, stacklevel=3)
        return False


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Names of the backends that work on ``device`` here, fastest first."""
    device = _device(device)
    return [b.name for b in _ranked(device) if _usable(b, device, warn=False)]


def requested_name(name: str) -> str:
    """``name`` with ``auto`` replaced by ``$FROMAGE_FUSED_BACKEND`` when that is set."""
    if name == AUTO:
        name = os.environ.get(ENV_VAR, "").strip() or AUTO
    if name != AUTO:
        get(name)
    return name


def check(name: str, device: Union[str, torch.device]) -> None:
    """Raise ``RuntimeError`` saying why the named backend cannot run on ``device``."""
    backend = get(name)
    device = _device(device)
    try:
        reason = backend.unavailable_reason(device)
    except BackendUnavailable as exc:
        reason = str(exc)
    if reason is not None:
        raise RuntimeError(f"fromage_fused backend {name!r} cannot run on {device}: {reason}")


def resolve(name: str, device: Union[str, torch.device]) -> Backend:
    """The backend that runs a step on ``device`` for the requested ``name`` (``auto`` allowed)."""
    name = requested_name(name)
    device = _device(device)
    if name != AUTO:
        check(name, device)
        return get(name)
    for backend in _ranked(device):
        if _usable(backend, device, warn=True):
            return backend
    raise RuntimeError(f"no fromage_fused backend runs on {device}")
