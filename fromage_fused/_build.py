"""How the C++/CUDA extension of ``csrc/`` is compiled; shared by setup.py (ahead of time) and
``backends/native.py`` (JIT). Imports nothing from the package, so setup.py can load it alone."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CPU_SOURCES = ["fromage_cpu.cpp", "fromage_plan.cpp"]
CUDA_SOURCES = ["fromage_cuda_ops.cpp", "fromage_cuda.cu"]


def cpu_compile_flags() -> List[str]:
    """C++ flags of the CPU kernels: the vector ISA of the building machine, and no FMA contraction
    in scalar code (so stochastically rounded bf16 results equal the torch recipe's bit for bit)."""
    flags = ["-O3", "-ffp-contract=off"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


def cuda_compile_flags() -> List[str]:
    return ["-O3", "-lineinfo"]


def cuda_unbuildable_reason() -> Optional[str]:
    """None if the CUDA kernels can be compiled here, else why not."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc / CUDA_HOME not found"
    return None
