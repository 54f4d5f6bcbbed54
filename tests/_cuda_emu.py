"""The CUDA kernels executed on the CPU: build the harness of ``tests/cuda_stand_in`` and run jobs on it.

``build(variant)`` compiles ``harness.cpp`` (the unmodified ``csrc/`` kernel headers on the stand-in
runtime of ``cuda_runtime.h``) with a C++20 compiler and a sanitizer set, into a cache keyed by a hash
of every source and the compiler, so that reruns start at once. A ``Job`` lists buffers of emulated
global memory, kernel launches (by driver name, see ``harness.cpp``) and the buffers to read back;
``Job.run`` executes it and returns what the sanitizers and the stand-in reported.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = ROOT / "tests" / "cuda_stand_in"
CSRC = ROOT / "csrc"

#: compiler flags per build variant; every variant keeps the C++ arithmetic as written (no FMA
#: contraction), like the device code under the _rn intrinsics, and allows the type punning of
#: device code (a float array read as float4).
VARIANTS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    "tsan": ["-fsanitize=thread"],
}
COMMON_FLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-fno-strict-aliasing",
                "-pthread", "-Wall", "-Wno-unknown-pragmas"]
#: run-time options of the sanitizers: stop at the first report, with a recognisable exit code.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=0:exitcode=86:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=88:report_signal_unsafe=0",
}

_DTYPE_CODES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


_PROBE = ("#include <atomic>\n#include <bit>\n#include <ucontext.h>\n"
          "int main() { int x = 0; std::atomic_ref<int>(x).fetch_add(1);"
          " auto f = []<class T>() { return std::bit_cast<unsigned>(1.0f); }; return f.template operator()<int>() == "
          "0; }\n")


def _compiles(cxx: str, flags) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(_PROBE)
        done = subprocess.run([cxx, "-std=c++20", *flags, str(src), "-o", str(Path(tmp) / "probe")],
                              capture_output=True, timeout=120)
        return done.returncode == 0


@functools.lru_cache(maxsize=None)
def compiler() -> Optional[str]:
    """A C++ compiler that builds the stand-in's C++20, or None."""
    for name in [os.environ.get("CXX"), "g++", "c++", "clang++"]:
        if name and shutil.which(name) and _compiles(name, []):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def unsupported(variant: str) -> Optional[str]:
    """Why ``variant`` cannot be built here (no compiler, or no such sanitizer), or None."""
    cxx = compiler()
    if cxx is None:
        return "needs a C++20 compiler (g++ >= 11 or clang++ >= 14)"
    if not _compiles(cxx, VARIANTS[variant]):
        return f"{cxx} cannot build with {' '.join(VARIANTS[variant])} here"
    return None


def _cache_root() -> Path:
    base = os.environ.get("FROMAGE_FUSED_EMU_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fromage_fused" / "cuda_emu"


def _sources(csrc: Path) -> List[Path]:
    return sorted(p for p in STAND_IN.rglob("*") if p.is_file()) + sorted(
        p for p in csrc.iterdir() if p.suffix in (".h", ".cuh"))


def build(variant: str = "asan", csrc: Path = CSRC, cxx: Optional[str] = None) -> Path:
    """The harness binary for ``variant`` over the kernel headers in ``csrc``, built once per state
    of the sources (written under a temporary name and renamed, so concurrent builds are safe)."""
    cxx = cxx or compiler()
    if cxx is None:
        raise RuntimeError("no C++20 compiler")
    flags = COMMON_FLAGS + VARIANTS[variant]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256("\0".join([cxx, version, *flags]).encode())
    for path in _sources(csrc):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    out = _cache_root() / f"{variant}-{h.hexdigest()[:20]}" / "harness"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"harness.tmp{os.getpid()}")
    cmd = [cxx, *flags, f"-I{STAND_IN}", f"-I{csrc}", str(STAND_IN / "harness.cpp"), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the emulator harness did not build ({' '.join(cmd)}):\n{done.stderr[-6000:]}")
    os.replace(tmp, out)
    return out


# -- jobs ---------------------------------------------------------------------------------------------


def _hex(x: float) -> str:
    return float(np.float32(x)).hex()


@dataclass
class Result:
    """What a run gave: the dumped buffers (by id), the exit code, and the stand-in's and sanitizers' output."""

    returncode: int
    stdout: str
    stderr: str
    dumps: Dict[str, bytes] = field(default_factory=dict)

    @property
    def report(self) -> Optional[str]:
        """The kind of failure, or None: ``asan``, ``ubsan``, ``tsan``, ``emulator`` or ``crash``."""
        err = self.stderr
        if "WARNING: ThreadSanitizer" in err:
            return "tsan"
        if "ERROR: AddressSanitizer" in err:
            return "asan"
        if "runtime error:" in err:
            return "ubsan"
        if "EMU ERROR" in err:
            return "emulator"
        if self.returncode != 0:
            return "crash"
        return None


class Job:
    """Buffers, launches and dumps, written as the harness's job file (see ``harness.cpp``)."""

    def __init__(self, slots: int = 1, order: str = "forward", seed: int = 0):
        self.lines: List[str] = []
        self.blob = bytearray()
        self.sizes: Dict[str, int] = {}
        self.dumped: List[tuple] = []  # (buffer, key)
        self.options(slots=slots, order=order, seed=seed)

    def options(self, **kv) -> None:
        self.lines.append("options " + " ".join(f"{k}={v}" for k, v in kv.items()))

    def buffer(self, data, lead: int = 0, name: Optional[str] = None) -> str:
        """A buffer holding ``data`` (numpy array or bytes; an int is that many bytes of junk), its
        first byte ``lead`` bytes into its allocation."""
        name = name or f"b{len(self.sizes)}"
        if isinstance(data, int):
            self.lines.append(f"buffer {name} {lead} {data} junk")
            self.sizes[name] = data
            return name
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        at = len(self.blob)
        self.blob += raw
        self.lines.append(f"buffer {name} {lead} {len(raw)} blob:{at}")
        self.sizes[name] = len(raw)
        return name

    def launch(self, kernel: str, *args) -> None:
        words = []
        for a in args:
            if a is None:
                words.append("-")
            elif isinstance(a, bool):
                words.append(str(int(a)))
            elif isinstance(a, float):
                words.append(_hex(a))
            else:
                words.append(str(a))
        self.lines.append(" ".join([kernel, *words]))

    def dump(self, name: str, key: Optional[str] = None) -> None:
        """Read ``name`` back (now, after the launches so far) as ``result.dumps[key or name]``."""
        self.lines.append(f"dump {name}")
        self.dumped.append((name, key or name))

    def run(self, binary: Path, timeout: float = 300) -> Result:
        with tempfile.TemporaryDirectory() as tmp:
            job, blob, out = Path(tmp) / "job.txt", Path(tmp) / "blob.bin", Path(tmp) / "out.bin"
            job.write_text("\n".join(self.lines) + "\n")
            blob.write_bytes(bytes(self.blob))
            env = dict(os.environ, **SANITIZER_ENV)
            done = subprocess.run([str(binary), str(job), str(blob), str(out)], capture_output=True, text=True,
                                  timeout=timeout, env=env)
            result = Result(done.returncode, done.stdout, done.stderr)
            if done.returncode == 0:
                data = out.read_bytes()
                at = 0
                for name, key in self.dumped:
                    result.dumps[key] = data[at:at + self.sizes[name]]
                    at += self.sizes[name]
            return result


# -- tensors as the kernels see them ------------------------------------------------------------------


@dataclass
class View:
    """A tensor of ``numel`` elements at element offset ``offset`` into its buffer (``None``: an empty
    tensor whose address is null, as the caching allocator gives for zero bytes)."""

    buffer: Optional[str]
    offset: int
    numel: int
    itemsize: int

    def ptr(self) -> str:
        if self.buffer is None:
            return "-"
        return f"{self.buffer}+{self.offset * self.itemsize}" if self.offset else self.buffer


def tensor_args(pairs: Sequence[tuple]) -> list:
    """The harness's tensor-list arguments for [(p View, g View)]."""
    out = [len(pairs)]
    for p, g in pairs:
        out += [p.ptr(), g.ptr(), p.numel]
    return out


def dtype_code(dtype) -> str:
    return _DTYPE_CODES[str(dtype).replace("torch.", "")]


def pack_i64(value: int) -> bytes:
    return struct.pack("<q", value)
