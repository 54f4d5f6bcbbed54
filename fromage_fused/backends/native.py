"""Loads the C++/CUDA extension of ``csrc/`` and wraps its ops as the ``cpu`` and ``cuda`` backends.

Where the ops come from, in order:

1. ``fromage_fused._C``, prebuilt by ``FROMAGE_FUSED_BUILD_EXT=1 pip install .``, when its build
   record (``_C.json`` beside it) says it was compiled for this torch, from the installed sources,
   for an instruction set this CPU has; otherwise it is left alone and the reason is printed;
2. a JIT build cached in ``$FROMAGE_FUSED_EXT_DIR/<variant>-<key>`` (default
   ``~/.cache/fromage_fused``), where ``<key>`` hashes the sources, the flags, torch and Python:
   two checkouts or two installed versions never share a build, and a build is never loaded for
   other sources;
3. a JIT build now, with ``torch.utils.cpp_extension.load`` and ninja: one line to stderr when it
   starts and one when it ends.

The build is lazy: it runs when a step first needs the backend (``auto`` choosing it at
construction, or a step), never inside a query such as ``available_backends``. The CUDA kernels
are part of it only where CUDA is available, torch is a CUDA build and nvcc is found; a failed
CUDA build falls back to the CPU-only build and its reason is what ``backend_report`` says for
``cuda``.

When it cannot be built, ``auto`` falls back to another backend with one warning; naming ``cpu`` or
``cuda`` raises with the reason. ``FROMAGE_FUSED_REQUIRE_EXT=1`` turns a failed build into an error
everywhere (CI sets it, so that a broken build fails the tests instead of hiding behind a fallback).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import FrozenSet, Iterator, List, Optional

import torch

from .. import _build
from .._build import CPU_SOURCES, CUDA_SOURCES, cuda_compile_flags, cuda_unbuildable_reason
from ..engine import ops as _ops
from ..engine.dtypes import KERNEL_DTYPES
from ._base import Backend, BackendUnavailable

REQUIRE_ENV = "FROMAGE_FUSED_REQUIRE_EXT"
DIR_ENV = "FROMAGE_FUSED_EXT_DIR"
VERBOSE_ENV = "FROMAGE_FUSED_VERBOSE_BUILD"
WAIT_ENV = "FROMAGE_FUSED_BUILD_WAIT"
WAIT_S = 1800.0  # how long to wait for another process's build before giving up
STALE_S = 3600.0  # where file locks do not work, a torch build lock older than this is stale
NOT_BUILT = "not built yet: builds on first use (1-2 minutes on a 2-core CPU)"
_LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"
_lock = threading.Lock()
#: The bytes of a block of ``pass_pair`` over its first pass's lists: what that pass touched of a
#: block should still be in the last-level cache when the second pass reads it.
PAIR_BLOCK_BYTES = 8 << 20
_ops.define(_ops.NATIVE)  # the schemas of the extension's engine ops, before any build registers kernels
_ops.define_pair(_ops.PAIR)
_state = {"loaded": None, "error": None, "cuda_error": None}
_fakes_registered = []


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def _fail(message: str):
    """A backend that should work here cannot: an error under ``$FROMAGE_FUSED_REQUIRE_EXT``, else
    ``BackendUnavailable`` (``auto`` falls back with a warning)."""
    if _required():
        raise RuntimeError(f"{REQUIRE_ENV} is set and {message}")
    raise BackendUnavailable(message)


def _say(message: str) -> None:
    print(f"fromage_fused: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fromage_fused"


def _library_name(variant: str) -> str:
    return f"fromage_fused_native_{variant}"


def build_dir(variant: str) -> Path:
    """Where the JIT build of ``variant`` ('cpu' or 'cuda') of the current sources lives."""
    return cache_root() / f"{variant}-{_build.build_key(_build.build_info(variant))}"


def _library(directory: Path, variant: str) -> Path:
    return directory / f"{_library_name(variant)}{_LIB_SUFFIX}"


def _built(directory: Path, variant: str) -> Optional[Path]:
    """The library of a finished build in ``directory`` (its record is written last), or None.
    Cheap, for queries: the record's size of the library is compared, its checksum only when it
    is loaded (:func:`_cached`)."""
    library = _library(directory, variant)
    try:
        record = json.loads((directory / "built.json").read_text())
        return library if library.stat().st_size == record.get("size") else None
    except (OSError, ValueError, AttributeError):
        return None


_checksums = {}


def _checksum(path: Path) -> str:
    """sha256 of the file at ``path``, computed once per (path, size, modification time)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _checksums:
        _checksums[key] = _build.file_sha256(path)
    return _checksums[key]


def _cached(directory: Path, variant: str):
    """``(library, None)`` for a finished build whose library matches the checksum in its record;
    ``(None, why)`` for a finished build that must not be loaded (a truncated or overwritten file
    would kill the process or fail to load); ``(None, None)`` where no build finished."""
    record_path, library = directory / "built.json", _library(directory, variant)
    if not record_path.is_file():
        return None, None
    try:
        record = json.loads(record_path.read_text())
        expected = record.get("sha256")
    except (OSError, ValueError, AttributeError):
        return None, "its build record is unreadable"
    if not library.is_file():
        return None, "its library is missing"
    if expected is None:
        return None, "its build record has no checksum (built by an older fromage_fused)"
    if _checksum(library) != expected:
        return None, "its library does not match the checksum in its build record (truncated or overwritten)"
    return library, None


def _clear(directory: Path) -> None:
    """Remove a build's files (not the lock this process holds): the next build starts from scratch."""
    for path in directory.iterdir():
        if path.name == "build.lock":
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _variants() -> List[str]:
    """The builds to try, best first: never the CUDA one where CUDA is not available."""
    if torch.cuda.is_available() and cuda_unbuildable_reason() is None:
        return ["cuda", "cpu"]
    return ["cpu"]


# --- the prebuilt extension ------------------------------------------------------------------

def _prebuilt_origin() -> Optional[str]:
    spec = importlib.util.find_spec("fromage_fused._C")
    return spec.origin if spec is not None and spec.origin else None


def prebuilt_problem(origin: str) -> Optional[str]:
    """Why the prebuilt library at ``origin`` must not be loaded here, or None if it fits."""
    record = Path(origin).with_name("_C.json")
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return f"it has no readable build record ({record.name})"
    try:
        damaged = info.get("sha256") != _checksum(Path(origin))
    except OSError as exc:
        return f"it cannot be read ({exc})"
    if damaged:
        return f"it does not match the checksum in its build record ({record.name}): truncated or overwritten"
    if info.get("torch") != torch.__version__:
        return f"it was built for torch {info.get('torch')} and this is torch {torch.__version__}"
    if _build.source_files() and info.get("sources") != _build.sources_hash():
        return f"it was built from other sources than those in {_build.CSRC}"
    mismatch = _build.cpu_mismatch(info.get("isa"))
    if mismatch:
        return f"it was compiled for {info.get('isa')} and {mismatch}"
    return None


def _usable_prebuilt() -> Optional[str]:
    origin = _prebuilt_origin()
    return origin if origin is not None and prebuilt_problem(origin) is None else None


# --- the JIT build ---------------------------------------------------------------------------

def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a virtual environment that is not activated has it beside
    its python (the ``ninja`` package) but not on PATH."""
    if shutil.which("ninja"):
        return
    candidates = [str(Path(sys.executable).parent)]
    try:
        import ninja

        candidates.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for directory in candidates:
        if shutil.which("ninja", path=directory):
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return


def _prerequisite_problem(variant: str) -> Optional[str]:
    """Why a JIT build of ``variant`` cannot even start here (cheap checks), or None."""
    sources = CPU_SOURCES + (CUDA_SOURCES if variant == "cuda" else [])
    missing = [s for s in sources if not (_build.CSRC / s).is_file()]
    if missing:
        return (f"the extension's sources {missing} are missing from {_build.CSRC}; reinstall fromage_fused "
                "(its wheel and sdist carry them)")
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install g++ or clang, or set CXX)"
    _ninja_on_path()
    if shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    return None


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[bool]:
    """Hold ``directory/build.lock`` while building; yield whether the lock is really held.

    An OS file lock, released by the kernel when its holder dies however it dies, so no lock can
    outlive the process that builds. While this lock is held, torch's own ``lock`` file (which a
    killed build leaves behind, and which makes every later build wait for ever) can only be stale.
    """
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the age bound in _clear_stale_baton applies
        yield False
        return
    with open(directory / "build.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            limit = float(os.environ.get(WAIT_ENV) or WAIT_S)
            _say(f"waiting for another process (pid {owner}) that is building the extension in {directory}")
            deadline = time.monotonic() + limit
            while True:
                time.sleep(0.5)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BackendUnavailable(
                            f"another process (pid {owner}) has been building the extension in {directory} for "
                            f"over {limit:.0f} s (${WAIT_ENV} sets this limit)") from None
        except OSError:  # a file system without locks
            yield False
            return
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear_stale_baton(directory: Path, locked: bool) -> None:
    """Remove torch's ``lock`` file left by a build that was killed (else torch waits for ever)."""
    baton = directory / "lock"
    try:
        age = time.time() - baton.stat().st_mtime
    except FileNotFoundError:
        return
    if locked or age > STALE_S:
        baton.unlink(missing_ok=True)
        _say(f"removed a stale build lock left by an interrupted build ({baton}, {age:.0f} s old)")


def _jit(variant: str, why: str = "first use") -> None:
    """Load the JIT build of ``variant``, building it first unless a finished build is cached."""
    problem = _prerequisite_problem(variant)
    if problem is not None:
        raise BackendUnavailable(problem)
    info = _build.build_info(variant)
    directory = cache_root() / f"{variant}-{_build.build_key(info)}"
    if _load_cached(directory, variant) is True:
        return
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory) as locked:
        # Another process may have finished (or repaired) the build meanwhile.
        damaged = _load_cached(directory, variant)
        if damaged is True:
            return
        if damaged is not None:
            # Built again once: a second failure is the error (and the fallback) of any failed build.
            _say(f"the cached build in {directory} is not usable ({damaged}): building it again")
            _clear(directory)
            why = f"the cached build was not usable: {damaged}"
        _clear_stale_baton(directory, locked)
        _compile(variant, info, directory, why)  # torch's load() loads it


def _load_cached(directory: Path, variant: str):
    """Load the finished build in ``directory`` if its library is intact: True when loaded; None
    where there is no finished build; else why it cannot be used."""
    library, damaged = _cached(directory, variant)
    if library is None:
        return damaged
    try:
        torch.ops.load_library(str(library))
        return True
    except OSError as exc:
        return f"it failed to load: {exc}"


def _compile(variant: str, info: dict, directory: Path, why: str) -> None:
    from torch.utils.cpp_extension import load

    what, how_long = (("C++/CUDA", "several minutes; cached for later runs") if variant == "cuda"
                      else ("C++", "1-2 minutes on a 2-core CPU; cached for later runs"))
    when = f"{why}, {how_long}" if why == "first use" else f"{how_long}; {why}"
    print(f"building the fromage_fused {what} extension for torch {torch.__version__} ({when})...", file=sys.stderr,
          flush=True)
    start = time.monotonic()
    sources = CPU_SOURCES + (CUDA_SOURCES if variant == "cuda" else [])
    try:
        load(
            name=_library_name(variant),
            sources=[str(_build.CSRC / s) for s in sources],
            extra_include_paths=[str(_build.CSRC)],
            extra_cflags=list(info["cflags"]),
            extra_ldflags=list(info["ldflags"]),
            extra_cuda_cflags=cuda_compile_flags(),
            build_directory=str(directory),
            with_cuda=variant == "cuda",
            is_python_module=False,
            verbose=bool(os.environ.get(VERBOSE_ENV)),
        )
    except BaseException:
        _say(f"the {what} build failed after {time.monotonic() - start:.0f} s")
        raise
    library = _library(directory, variant)
    record = dict(info, library=library.name, size=library.stat().st_size, sha256=_build.file_sha256(library))
    (directory / "built.json").write_text(json.dumps(record, indent=1))
    _say(f"built the {what} extension in {time.monotonic() - start:.0f} s (cached in {directory})")


def _summary(exc: Exception) -> str:
    """The compiler's error lines of a failed build (torch puts the whole log in the message)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return " | ".join((errors or lines or [repr(exc)])[:3])


# --- loading ---------------------------------------------------------------------------------

def _load_once() -> str:
    """Load the ops into ``torch.ops.fromage_fused``; return how ('prebuilt', 'jit-cuda', 'jit-cpu')."""
    errors = []
    why = "first use"
    origin = _prebuilt_origin()
    if origin is not None:
        problem = prebuilt_problem(origin)
        if problem is None:
            try:
                torch.ops.load_library(origin)
                return "prebuilt"
            except OSError as exc:
                problem = f"it failed to load ({exc})"
        why = f"the prebuilt extension is not used: {problem}"
        errors.append(f"prebuilt {origin} not used: {problem}")
    for variant in _variants():
        try:
            _jit(variant, why)
            return f"jit-{variant}"
        except BackendUnavailable:
            raise
        except Exception as exc:  # compile error, a failed load
            errors.append(f"JIT build ({variant}) failed: {_summary(exc)}")
            if variant == "cuda":
                _state["cuda_error"] = errors[-1]
    raise BackendUnavailable(
        "the C++ extension could not be built: " + "; ".join(errors) +
        f" ({VERBOSE_ENV}=1 shows the build log)"
    )


def load() -> str:
    """Load the extension once per process, building it if needed; raise ``BackendUnavailable``
    (``RuntimeError`` under ``$FROMAGE_FUSED_REQUIRE_EXT``) with the reason when it cannot be built."""
    with _lock:
        if _state["loaded"] is None and _state["error"] is None:
            try:
                _state["loaded"] = _load_once()
                _register_fakes()
            except BackendUnavailable as exc:
                _state["error"] = exc
        if _state["error"] is not None:
            _fail(str(_state["error"]))
        return _state["loaded"]


def _ensure_loaded() -> None:
    # Lock-free once loaded: a step traced by torch.compile must not enter the lock.
    if _state["loaded"] is None:
        load()


def has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(_ops.NATIVE, "CUDA")


def _no_cuda_kernels() -> str:
    why = _state.get("cuda_error") or "it was built where torch was CPU-only or nvcc was missing"
    return f"the extension has no CUDA kernels: {why}"


def status(device_type: str) -> Optional[str]:
    """Cheap: None if the backend for ``device_type`` can run here (loaded, loadable, or buildable
    on first use), a reason if it cannot; raises (see ``_fail``) if it should but failed."""
    if _state["loaded"] is not None:
        if device_type == "cuda" and not has_cuda_kernels():
            _fail(_no_cuda_kernels())
        return None
    if _state["error"] is not None:
        _fail(str(_state["error"]))
    prebuilt = _usable_prebuilt()
    if device_type == "cuda":
        reason = cuda_unbuildable_reason()
        if reason is not None and prebuilt is None:
            return f"the CUDA kernels cannot be built here: {reason}"
    if prebuilt is None and _built(build_dir(_variants()[0]), _variants()[0]) is None:
        problem = _prerequisite_problem(_variants()[0])
        if problem is not None:
            _fail(f"the C++ extension cannot be built: {problem}")
    return None


def pending(device_type: str) -> Optional[str]:
    """``NOT_BUILT`` if the first use of the backend will compile the extension, else None."""
    if _state["loaded"] is not None or _usable_prebuilt() is not None:
        return None
    variant = _variants()[0]
    if _built(build_dir(variant), variant) is not None:
        return None
    return NOT_BUILT.replace("1-2 minutes on a 2-core CPU", "several minutes") if variant == "cuda" else NOT_BUILT


def _register_fakes() -> None:
    """Meta/fake implementations of the extension's own test ops (the engine's op has its fake in
    ``engine/ops.py``), so that torch.compile can trace them."""
    if _fakes_registered:
        return
    _fakes_registered.append(True)

    @torch.library.register_fake("fromage_fused::round_bf16_stochastic")
    def _round_fake(x, seed, tensor_index):
        return torch.empty_like(x, dtype=torch.bfloat16)


@lru_cache(maxsize=None)
def native_rules() -> FrozenSet[str]:
    """The names of the rules the extension's kernels know: the entries of ``FF_RULES`` in
    ``csrc/rules.h``, read from the sources the extension is built from (no build needed)."""
    try:
        text = (_build.CSRC / "rules.h").read_text()
    except OSError:
        return frozenset()
    _, _, rules = text.partition("#define FF_RULES(X)")
    return frozenset(re.findall(r'X\("([^"]+)"', rules))


def _concat(lists):
    return lists[0] if len(lists) == 1 else [t for tensors in lists for t in tensors]


def _written_and_read(lists, writes: int):
    """A pass's lists as its op takes them: the written ones, then the others, each laid end to end."""
    return (_concat(lists[:writes]) if writes else []), _concat(lists[writes:])


class NativeBackend(Backend):
    """The ops of the extension on one device type. fp64 groups go to ``foreach``.

    Relies on the step plan's guarantees (``_base.py``): non-empty lists of contiguous tensors.
    """

    syncs = False
    dtypes = KERNEL_DTYPES
    #: The ops' namespace; None: ``torch.ops.fromage_fused`` (the benchmark stubs it to time the host side).
    _ops = None

    def __init__(self, name: str, device_type: str, priority: int):
        self.name = name
        self.device_type = device_type
        self.priority = priority
        # Read once here, not in ``has_rule``: a step under torch.compile builds its plan (and so
        # picks each group's backend) while it is traced, and the file read breaks the graph.
        self.rules = native_rules()

    def priority_on(self, device):
        return self.priority if torch.device(device).type == self.device_type else -1

    def unavailable_reason(self, device):
        # Cheap: never builds (see ``prepare``); raises when a build failed or cannot start.
        device = torch.device(device)
        if device.type != self.device_type:
            return f"runs on {self.device_type} tensors only"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return status(self.device_type)

    def pending(self, device):
        """What the first use will do first (compile the extension), or None if it is ready."""
        return pending(self.device_type)

    def prepare(self, device):
        """Load the extension, building it on first use; the registry calls this before a step."""
        load()
        if self.device_type == "cuda" and not has_cuda_kernels():
            _fail(_no_cuda_kernels())

    def has_rule(self, rule) -> bool:
        # A rule without kernels in the extension: its groups go to the fallback backend.
        return rule.name in self.rules

    def run_pass(self, rule, index, call):
        _ensure_loaded()
        out = _ops.call(self._ops or torch.ops.fromage_fused,
                        rule.name, index, *_written_and_read(call.lists, call.writes), call.sums, call.hyper,
                        call.flags, call.scalar_list, rule.kernel_globals(call), call.found_inf, call.grad_scale,
                        call.seed, 0)
        return out if rule.passes[index].sums_for(call.flags) else None

    def pairs(self, call) -> bool:
        # On CPU only: a GPU's passes gain nothing from the cache. (Not with a stand-in for the ops.)
        return self.device_type == "cpu" and self._ops is None

    def run_pair(self, rule, index, call):
        _ensure_loaded()
        globals_ = rule.kernel_globals(call)
        names, w_next = rule.passes[index + 1].lists_for(call.flags)
        call.index = index + 1
        globals_next = rule.kernel_globals(call)
        call.index = index
        return torch.ops.fromage_fused.pass_pair(
            rule.name, index, *_written_and_read(call.lists, call.writes),
            *_written_and_read(call.group.lists(names), w_next), call.sums, call.hyper, call.flags, call.scalar_list,
            globals_, globals_next, call.found_inf, call.grad_scale, PAIR_BLOCK_BYTES)
