"""Machine code of the CUDA kernels, compiled here for sm_90 (no GPU needed) and read back.

The phases are bound by memory bandwidth, which needs many loads in flight per thread: each
thread of the update and stats loops issues 2 * kStage = 8 16-byte loads before it uses (or, in
the update, stores) any of them. Without the staging the compiler cannot move a load above the
store before it, through pointers that may alias, and keeps only 2-3 in flight.
"""
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
STAGED_LOADS = 8
STAGED_SCALAR_LOADS = 16  # 2 operands x kScalarStage


def _tool(name):
    found = shutil.which(name)
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:  # Triton's NVIDIA backend ships cuobjdump
        candidate = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    nvcc, cuobjdump = _tool("nvcc"), _tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump")
    obj = tmp_path_factory.mktemp("sass") / "fromage_cuda.o"
    subprocess.run([nvcc, "-std=c++17", "-O3", f"-I{CSRC}", "-c", str(CSRC / "fromage_cuda.cu"), "-o", str(obj),
                    "-gencode", "arch=compute_90,code=sm_90"], check=True, capture_output=True, timeout=300)
    out = subprocess.run([cuobjdump, "-sass", str(obj)], check=True, capture_output=True, text=True).stdout
    functions = {}
    name = None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            functions[name] = []
        elif name is not None and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            functions[name].append(line)
    return functions


def loads_in_flight(lines):
    """The longest run of 16-byte global loads with no 16-byte store or branch between them."""
    best = run = 0
    for line in lines:
        if re.search(r"\bLDG\.E\.128\b", line):
            run += 1
            best = max(best, run)
        elif re.search(r"\bSTG\.E\.128\b|\bBRA\b", line):
            run = 0
    return best


def scalar_loads_in_flight(lines):
    """The longest run of 32- or 16-bit global loads (plain, not cache-global) with no store or branch between them."""
    best = run = 0
    for line in lines:
        if re.search(r"\bLDG\.E(\.U16)?\s", line):
            run += 1
            best = max(best, run)
        elif re.search(r"\bSTG\.|\bBRA\b", line):
            run = 0
    return best


def kernels(sass, prefix):
    found = {name: lines for name, lines in sass.items() if prefix in name}
    assert found, f"no {prefix} kernels in {list(sass)}"
    return found


@pytest.mark.parametrize("kernel", ["apply_kernel", "stats_kernel"])
def test_vector_loops_keep_eight_loads_in_flight(sass, kernel):
    for name, lines in kernels(sass, kernel).items():
        assert loads_in_flight(lines) >= STAGED_LOADS, f"{name}: {loads_in_flight(lines)} 16-byte loads in flight"


def test_table_addresses_become_global_accesses(sass):
    # Generic (LD/ST) accesses to the parameters would cost an address-space check each.
    for name, lines in kernels(sass, "_kernel").items():
        generic = [ln for ln in lines if re.search(r"\b(LD|ST)\.E\.128\b", ln)]
        assert not generic, f"{name}: generic 16-byte accesses {generic[:2]}"


def test_misaligned_update_keeps_sixteen_loads_in_flight(sass):
    # Where p and g cannot be read as aligned vectors together, each thread loads kScalarStage
    # elements of both before it stores any (one pair at a time, a load waits for the store before
    # it). The kernel's prologue (table, stats row, scalars) has fewer plain loads in a row.
    for name, lines in kernels(sass, "apply_kernel").items():
        got = scalar_loads_in_flight(lines)
        assert got >= STAGED_SCALAR_LOADS, f"{name}: {got} scalar loads in flight"
