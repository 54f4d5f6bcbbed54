"""Loads the C++/CUDA extension of ``csrc/`` and wraps its ops as the ``cpu`` and ``cuda`` backends.

The extension is used prebuilt when ``FROMAGE_FUSED_BUILD_EXT=1 pip install --no-build-isolation -e .``
built ``fromage_fused._C``; otherwise it is built on first use with ``torch.utils.cpp_extension.load``
and ninja into ``$FROMAGE_FUSED_EXT_DIR`` (default ``~/.cache/fromage_fused``) and loaded from there
afterwards. The CUDA kernels are part of it only where torch is a CUDA build and nvcc is found.

When it cannot be built, ``auto`` falls back to another backend with one warning; naming ``cpu`` or
``cuda`` raises with the reason. ``FROMAGE_FUSED_REQUIRE_EXT=1`` turns a failed build into an error
everywhere (CI sets it, so that a broken build fails the tests instead of hiding behind a fallback).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from .._build import CPU_SOURCES, CSRC, CUDA_SOURCES, cpu_compile_flags, cuda_compile_flags, cuda_unbuildable_reason
from ._base import Backend, BackendUnavailable

REQUIRE_ENV = "FROMAGE_FUSED_REQUIRE_EXT"
DIR_ENV = "FROMAGE_FUSED_EXT_DIR"
_lock = threading.Lock()
_state = {"loaded": None, "error": None, "cuda_error": None}
_fakes_registered = []


def _cache_dir(variant: str) -> Path:
    root = Path(os.environ.get(DIR_ENV) or Path.home() / ".cache" / "fromage_fused")
    tag = f"torch{torch.__version__}".replace("+", "_")
    path = root / tag / variant
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a virtual environment that is not activated has it beside
    its python (the ``ninja`` package) but not on PATH."""
    if shutil.which("ninja"):
        return
    candidates = [str(Path(sys.executable).parent)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except ImportError:
        pass
    for directory in candidates:
        if shutil.which("ninja", path=directory):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return


def _jit(variant: str) -> None:
    from torch.utils.cpp_extension import load

    _ninja_on_path()

    sources = CPU_SOURCES + (CUDA_SOURCES if variant == "cuda" else [])
    missing = [s for s in sources if not (CSRC / s).is_file()]
    if missing:
        raise BackendUnavailable(f"extension sources not found in {CSRC} ({missing}); install from a source tree")
    load(
        name=f"fromage_fused_native_{variant}",
        sources=[str(CSRC / s) for s in sources],
        extra_include_paths=[str(CSRC)],
        extra_cflags=cpu_compile_flags(),
        extra_cuda_cflags=cuda_compile_flags(),
        build_directory=str(_cache_dir(variant)),
        is_python_module=False,
        verbose=bool(os.environ.get("FROMAGE_FUSED_VERBOSE_BUILD")),
    )


def _summary(exc: Exception) -> str:
    """The compiler's error lines of a failed build (torch puts the whole log in the message)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return " | ".join((errors or lines or [repr(exc)])[:3])


def _load_once() -> str:
    """Load the ops into ``torch.ops.fromage_fused``; return how ('prebuilt', 'jit-cuda', 'jit-cpu')."""
    spec = importlib.util.find_spec("fromage_fused._C")
    errors = []
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
            return "prebuilt"
        except OSError as exc:  # built against another torch: rebuild below
            errors.append(f"prebuilt {spec.origin} failed to load ({exc})")
    variants = ["cuda", "cpu"] if cuda_unbuildable_reason() is None else ["cpu"]
    for variant in variants:
        try:
            _jit(variant)
            return f"jit-{variant}"
        except BackendUnavailable:
            raise
        except Exception as exc:  # compiler missing, compile error, ninja missing
            errors.append(f"JIT build ({variant}) failed: {_summary(exc)}")
            if variant == "cuda":
                _state["cuda_error"] = errors[-1]
    raise BackendUnavailable(
        "the C++ extension could not be built: " + "; ".join(errors) +
        " (needs a C++ compiler and ninja; FROMAGE_FUSED_VERBOSE_BUILD=1 shows the build log)"
    )


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def load() -> str:
    """Load the extension once per process; raise ``BackendUnavailable`` (or ``RuntimeError`` under
    ``$FROMAGE_FUSED_REQUIRE_EXT``) with the reason when it cannot be built."""
    with _lock:
        if _state["loaded"] is None and _state["error"] is None:
            try:
                _state["loaded"] = _load_once()
                _register_fakes()
            except BackendUnavailable as exc:
                _state["error"] = exc
        if _state["error"] is not None:
            if _required():
                raise RuntimeError(f"{REQUIRE_ENV} is set and {_state['error']}")
            raise _state["error"]
        return _state["loaded"]


def _ensure_loaded() -> None:
    # Lock-free once loaded: a step traced by torch.compile must not enter the lock.
    if _state["loaded"] is None:
        load()


def has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fromage_fused::apply_", "CUDA")


def _register_fakes() -> None:
    """Meta/fake implementations, so that torch.compile can trace the ops."""
    if _fakes_registered:
        return
    _fakes_registered.append(True)

    @torch.library.register_fake("fromage_fused::stats")
    def _stats_fake(params, grads, inner):
        return params[0].new_empty((len(params), 3), dtype=torch.float32) if params else torch.empty(0, 3)

    @torch.library.register_fake("fromage_fused::apply_")
    def _apply_fake(params, grads, stats, lr, max_norms, p_bound, maximize, prefactor, found_inf, grad_scale, sr_seed):
        return None

    @torch.library.register_fake("fromage_fused::round_bf16_stochastic")
    def _round_fake(x, seed, tensor_index):
        return torch.empty_like(x, dtype=torch.bfloat16)


class NativeBackend(Backend):
    """The ops of the extension on one device type. fp64 groups go to ``foreach``.

    Relies on the step plan's guarantees (``_base.py``): non-empty lists of contiguous tensors.
    """

    syncs = False
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    #: The ops' namespace; None: ``torch.ops.fromage_fused`` (the benchmark stubs it to time the host side).
    _ops = None

    def __init__(self, name: str, device_type: str, priority: int):
        self.name = name
        self.device_type = device_type
        self.priority = priority

    def priority_on(self, device):
        return self.priority if torch.device(device).type == self.device_type else -1

    def unavailable_reason(self, device):
        device = torch.device(device)
        if device.type != self.device_type:
            return f"runs on {self.device_type} tensors only"
        if self.device_type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            reason = cuda_unbuildable_reason()
            if reason is not None and importlib.util.find_spec("fromage_fused._C") is None:
                return f"the CUDA kernels cannot be built here: {reason}"
        load()
        if self.device_type == "cuda" and not has_cuda_kernels():
            why = _state.get("cuda_error") or "no nvcc or no CUDA torch when it was built"
            message = f"the extension has no CUDA kernels: {why}"
            if _required():
                raise RuntimeError(f"{REQUIRE_ENV} is set and {message}")
            raise BackendUnavailable(message)
        return None

    def stats(self, params, grads, *, inner=True):
        _ensure_loaded()
        return (self._ops or torch.ops.fromage_fused).stats(params, grads, inner)

    def apply(self, params, grads, stats, *, lr, max_norms, p_bound, maximize, prefactor=True, found_inf=None, grad_scale=None, sr_seed=None):
        _ensure_loaded()
        (self._ops or torch.ops.fromage_fused).apply_(
            params, grads, stats, lr, [] if max_norms is None else max_norms,
            None if p_bound is None else float(p_bound), maximize, prefactor, found_inf, grad_scale, sr_seed,
        )
