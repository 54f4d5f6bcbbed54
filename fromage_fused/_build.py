"""How the C++/CUDA extension is compiled and what a build depends on; shared by setup.py (ahead of
time) and ``backends/native.py`` (JIT). Imports nothing from the package, so setup.py can load it
alone, and imports torch only inside the functions that need it.

The sources are ``csrc/`` of the source tree; an installed package carries a copy as
``fromage_fused/csrc`` (package data), so a plain ``pip install`` can JIT-build them.
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

CPU_SOURCES = ["fromage_cpu.cpp", "fromage_table_hook.cpp", "fromage_plan.cpp"]
CUDA_SOURCES = ["fromage_cuda_ops.cpp", "fromage_cuda.cu"]
SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")
# What the AVX2 build of the CPU kernels executes; a CPU lacking one of these would die with an
# illegal instruction, so a binary built with them is loaded only where /proc/cpuinfo lists them.
AVX2_CPU_FLAGS = ("avx2", "fma", "f16c")
OPENMP_ENV = "FROMAGE_FUSED_OPENMP"
_GCC = re.compile(r"(^|-)[gc]\+\+(-[0-9.]+)?$")  # g++, g++-12, x86_64-linux-gnu-g++-12, c++ (not clang++)


def _find_csrc() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):  # installed package, then source tree
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    return here / "csrc"


CSRC = _find_csrc()


def source_files(csrc: Optional[Path] = None) -> List[Path]:
    csrc = CSRC if csrc is None else csrc
    return sorted(p for p in csrc.iterdir() if p.suffix in SOURCE_SUFFIXES) if csrc.is_dir() else []


def sources_hash(csrc: Optional[Path] = None) -> str:
    """sha256 over the names and bytes of every source and header: a build is only ever reused for
    exactly the sources it was compiled from."""
    digest = hashlib.sha256()
    for path in source_files(csrc):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cpu_isa() -> Optional[str]:
    """The vector ISA the CPU kernels are compiled for on this machine: ``"avx2"`` or None."""
    import torch

    return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else None


def cpu_compile_flags(isa: Optional[str] = "detect") -> List[str]:
    """C++ flags of the CPU kernels: the vector ISA (of this machine unless given), and no FMA
    contraction (the apply phase rounds every product and sum, as every backend does: docs/backends.md,
    "Bit-identical results")."""
    if isa == "detect":
        isa = cpu_isa()
    flags = ["-O3", "-ffp-contract=off"]
    if isa == "avx2":
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags + openmp_flags()


def openmp_flags() -> List[str]:
    """``-fopenmp`` (compile and link) where the CPU kernels can run on torch's threads, else [].

    ``at::parallel_for`` is a header template that runs its body on one thread unless the code
    calling it is compiled with OpenMP; torch's ``cpp_extension`` does not add the flag. Used on
    Linux with a GCC compiler and a torch built with OpenMP: the extension then links the same
    ``libgomp.so.1`` that torch has loaded, so ``torch.set_num_threads`` governs its threads.
    ``$FROMAGE_FUSED_OPENMP`` = 1 or 0 forces the choice."""
    forced = os.environ.get(OPENMP_ENV, "").strip()
    if forced in ("0", "1"):
        return ["-fopenmp"] if forced == "1" else []
    import torch

    if not sys.platform.startswith("linux") or not torch.backends.openmp.is_available():
        return []
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    if compiler is None or not _GCC.search(os.path.basename(os.path.realpath(compiler))):
        return []
    return ["-fopenmp"]


def cuda_compile_flags() -> List[str]:
    return ["-O3", "-lineinfo"]


def required_cpu_flags(isa: Optional[str]) -> Set[str]:
    return set(AVX2_CPU_FLAGS) if isa == "avx2" else set()


def cpu_flags_here() -> Optional[Set[str]]:
    """The CPU feature flags of this machine from /proc/cpuinfo; None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_mismatch(isa: Optional[str]) -> Optional[str]:
    """Why a binary compiled for ``isa`` must not run on this CPU, or None if it can. Both the
    kernel's flags (/proc/cpuinfo) and torch's own run-time detection (cpuid) must agree that the
    CPU has what the binary executes."""
    needed = required_cpu_flags(isa)
    if not needed:
        return None
    have = cpu_flags_here()
    missing = sorted(needed - have) if have is not None else []
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if cpu_isa() != isa:
        import torch

        return f"torch detects CPU capability {torch.backends.cpu.get_cpu_capability()} here"
    return None


def cuda_unbuildable_reason() -> Optional[str]:
    """None if the CUDA kernels can be compiled here, else why not."""
    import torch

    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc / CUDA_HOME not found"
    return None


def cuda_archs() -> str:
    """The GPU architectures a CUDA build compiles for, as torch's ``cpp_extension`` chooses them:
    ``$TORCH_CUDA_ARCH_LIST`` when set, else the compute capabilities of the visible GPUs (sorted,
    separators normalised). Part of the build key: a build for one GPU has no kernels for another."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed:
        return " ".join(sorted(set(listed.replace(";", " ").split())))
    import torch

    if not torch.cuda.is_available():
        return ""
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return " ".join(f"{major}.{minor}" for major, minor in sorted(capabilities))


def file_sha256(path) -> str:
    """sha256 of a file's bytes (a built library, checked against its build record before loading)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_info(variant: str, isa: Optional[str] = "detect") -> Dict[str, object]:
    """Everything a build of ``variant`` ('cpu' or 'cuda') depends on; its hash names the build."""
    import torch

    if isa == "detect":
        isa = cpu_isa()
    return {
        "variant": variant,
        "sources": sources_hash(),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "cuda": torch.version.cuda if variant == "cuda" else None,
        "cuda_arch": cuda_archs() if variant == "cuda" else None,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "machine": platform.machine(),
        "isa": isa,
        "cxx": os.environ.get("CXX", ""),
        "cflags": cpu_compile_flags(isa),
        "ldflags": openmp_flags(),
        "cuda_cflags": cuda_compile_flags() if variant == "cuda" else [],
    }


def build_key(info: Dict[str, object]) -> str:
    digest = hashlib.sha256(repr(sorted(info.items())).encode())
    return digest.hexdigest()[:16]
