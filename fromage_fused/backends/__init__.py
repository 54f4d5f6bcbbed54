"""Backend registry: which backends exist, which work here, and which one ``auto`` picks.

A backend joins by adding one module to this package that defines ``BACKEND``, an instance of
:class:`~fromage_fused.backends._base.Backend`. ``auto`` tries them by descending ``priority``;
the environment variable ``FROMAGE_FUSED_BACKEND`` replaces ``auto`` with a named backend.

A module that fails to import (an optional dependency missing, say) becomes a backend of the
module's name that is unavailable everywhere with the import error as its reason; nothing else
changes. Two optional hooks of a backend: ``prepare(device)`` does the slow work of its first use
(the native backends build their extension there) and runs when a backend is chosen, never in a
query; ``pending(device)`` says what that first use will do (or None when nothing is left to do).
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
AVAILABLE = "available"

__all__ = ["Backend", "BackendUnavailable", "available_backends", "backend_names", "backend_report", "get", "resolve",
           "ENV_VAR"]


class Unimportable(Backend):
    """Stands for a backend module that could not be imported: unavailable, with the reason."""

    priority = -100

    def __init__(self, name: str, error: BaseException):
        self.name = name
        self.error = f"its module fromage_fused.backends.{name} cannot be imported ({type(error).__name__}: {error})"

    def unavailable_reason(self, device):
        return self.error

    def priority_on(self, device):
        return self.priority


@lru_cache(maxsize=None)
def _registry() -> Dict[str, Backend]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # a missing optional dependency, or a broken one
            found[info.name] = Unimportable(info.name, exc)
            continue
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


def _prepare(backend: Backend, device: torch.device) -> None:
    hook = getattr(backend, "prepare", None)
    if hook is not None:
        hook(device)


def _usable(backend: Backend, device: torch.device, *, warn: bool, prepare: bool = False) -> bool:
    try:
        if backend.unavailable_reason(device) is not None:
            return False
        if prepare:
            _prepare(backend, device)
        return True
    except BackendUnavailable as exc:
        if warn and (backend.name, device.type) not in _warned:
            _warned.add((backend.name, device.type))
            warnings.warn(f"fromage_fused: backend {backend.name!r} failed to load, falling back: {exc}", RuntimeWarning, stacklevel=3)
        return False


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """Names of the backends that can run on ``device`` here, fastest first.

    Cheap: it builds nothing. A native backend whose extension is not built yet is listed (it
    builds on first use); :func:`backend_report` says so, and a build that then fails makes
    ``auto`` fall back with one warning."""
    device = _device(device)
    return [b.name for b in _ranked(device) if _usable(b, device, warn=False)]


def backend_report(device: Union[str, torch.device] = "cpu") -> Dict[str, str]:
    """For every known backend, fastest first on ``device``: ``"available"``, ``"available, "``
    followed by what its first use will do (``"available, not built yet: ..."``), or why it cannot
    run there. Cheap, like :func:`available_backends`; it never raises for a backend."""
    device = _device(device)
    report = {}
    for backend in _ranked(device):
        try:
            reason = backend.unavailable_reason(device)
            if reason is None:
                hook = getattr(backend, "pending", None)
                todo = hook(device) if hook is not None else None
                reason = AVAILABLE if todo is None else f"{AVAILABLE}, {todo}"
        except Exception as exc:  # BackendUnavailable, or RuntimeError under FROMAGE_FUSED_REQUIRE_EXT
            reason = str(exc)
        report[backend.name] = reason
    return report


def requested_name(name: str) -> str:
    """``name`` with ``auto`` replaced by ``$FROMAGE_FUSED_BACKEND`` when that is set."""
    if name == AUTO:
        name = os.environ.get(ENV_VAR, "").strip() or AUTO
        if name != AUTO and name not in _registry():
            raise ValueError(f"${ENV_VAR} is {name!r}, which names no backend; unset it or choose one of "
                             f"{[AUTO] + list(_registry())}")
    if name != AUTO:
        get(name)
    return name


def check(name: str, device: Union[str, torch.device]) -> None:
    """Make the named backend ready on ``device`` (building what its first use needs), or raise
    ``RuntimeError`` saying why it cannot run there."""
    backend = get(name)
    device = _device(device)
    try:
        reason = backend.unavailable_reason(device)
        if reason is None:
            _prepare(backend, device)
    except BackendUnavailable as exc:
        reason = str(exc)
    if reason is not None:
        raise RuntimeError(f"fromage_fused backend {name!r} cannot run on {device}: {reason}")


def resolve(name: str, device: Union[str, torch.device]) -> Backend:
    """The backend that runs a step on ``device`` for the requested ``name`` (``auto`` allowed),
    ready to run: the first use of a native backend builds its extension here."""
    name = requested_name(name)
    device = _device(device)
    if name != AUTO:
        check(name, device)
        return get(name)
    for backend in _ranked(device):
        if _usable(backend, device, warn=True, prepare=True):
            return backend
    raise RuntimeError(f"no fromage_fused backend runs on {device}")
