"""Optimizers of other packages that the benchmark and the tests compare with, found without
importing those packages whole.

``import timm`` imports torchvision, and installing torchvision pins (and so may replace) torch;
timm's optimizer modules need only torch. So timm is installed without its dependencies
(``pip install --no-deps timm``) and its ``lars.py`` and ``lamb.py`` are loaded from its folder,
under a private package name, with the helper modules they import beside them. Where the user
has imported ``timm.optim`` already, that is used as it is.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

#: The timm release whose behaviour docs/lars_lamb_semantics.md describes.
TIMM_VERSION = "1.0.31"
_PRIVATE = "_fromage_fused_timm_optim"


class Unavailable(ImportError):
    """The package is not installed here, or not in a form this module can load."""


def timm_version() -> str:
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable(f'timm is not installed: pip install --no-deps "timm=={TIMM_VERSION}"') from None


def timm_optimizers():
    """timm's ``(Lars, Lamb)`` classes. Raises :class:`Unavailable` with what to install."""
    loaded = sys.modules.get("timm.optim")
    if loaded is not None:
        return loaded.Lars, loaded.Lamb
    timm_version()
    spec = importlib.util.find_spec("timm")  # finds the folder; runs none of timm's code
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    optim = [Path(f) / "optim" for f in folders if (Path(f) / "optim" / "lamb.py").is_file()]
    if not optim:
        raise Unavailable(f"timm is installed but has no optim/lamb.py in {folders}")
    package = sys.modules.get(_PRIVATE)
    if package is None:
        package = types.ModuleType(_PRIVATE)
        package.__path__ = [str(optim[0])]
        sys.modules[_PRIVATE] = package
    try:
        lars = importlib.import_module(f"{_PRIVATE}.lars")
        lamb = importlib.import_module(f"{_PRIVATE}.lamb")
    except ImportError as exc:
        raise Unavailable(f"timm's optimizer modules do not load without timm's package ({exc})") from None
    return lars.Lars, lamb.Lamb


def apex_fused_lamb():
    """apex's ``FusedLAMB`` (CUDA only; apex built with its CUDA extensions)."""
    try:
        from apex.optimizers import FusedLAMB
    except Exception as exc:  # apex without its extensions fails at import with various errors
        raise Unavailable(f"apex.optimizers.FusedLAMB is not importable here ({type(exc).__name__}: {exc})") from None
    return FusedLAMB
