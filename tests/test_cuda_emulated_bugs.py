"""The emulated CUDA kernels catch real bugs: each bug below is planted in a copy of the kernel
sources, the harness is built from the copy, and a step that runs the broken code must be reported
by the tool named (a sanitizer, the stand-in, or the checks of a result). The same step on the
sources as they are passes (test_cuda_emulated.py), so what is caught is the bug.
"""
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import _cuda_emu as emu
import _emulated_groups as groups

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++20 compiler (g++ >= 11 or clang++ >= 14)")


@dataclass(frozen=True)
class Bug:
    name: str
    old: str  # text of csrc/fromage_kernels.cuh, present exactly once
    new: str
    build: str  # "asan" (with UBSan) or "tsan"
    caught_by: str  # Result.report, or "result" for a wrong result with no report
    fmt: str
    alignment: str
    sizes: tuple


PLANTED = [
    Bug("vector loop bound one too far",
        "  for (; i < split.vec_end; i += kStep) {", "  for (; i <= split.vec_end; i += kStep) {",
        "asan", "asan", "fp32", "aligned", (3, 65537)),
    Bug("alignment check removed",
        "  if (((a ^ b) & 15u) != 0 || (a & (kSize - 1)) != 0) return Split{0, 0};",
        "  if ((a & (kSize - 1)) != 0) return Split{0, 0};",
        "asan", "ubsan", "bf16", "mixed", (65537,)),
    Bug("wrong partials index",
        "    float* out = partials + 3 * static_cast<int64_t>(blockIdx.x);",
        "    float* out = partials + 3 * static_cast<int64_t>(blockIdx.x + 1);",
        "asan", "asan", "fp32", "aligned", (131584,)),
    Bug("__syncthreads removed",
        "    sh[2][warp] = c;\n  }\n  __syncthreads();\n", "    sh[2][warp] = c;\n  }\n",
        "tsan", "tsan", "fp32", "aligned", (3, 65537)),
    # The defects fixed in these kernels, put back.
    Bug("max_norm stored without an atomic",
        "    atomicExch(max_norm, c.max_norm);", "    *max_norm = c.max_norm;",
        "tsan", "tsan", "fp32", "aligned", (65537, 3)),  # tensor 0's max_norm is unset: its first block writes it
    Bug("null address promised global",
        "  if (s.p == 0) s.p = reinterpret_cast<int64_t>(table);\n", "",
        "asan", "emulator", "fp32", "aligned", (3, 0)),
]


def _planted_sources(root: Path, bug: Bug) -> Path:
    csrc = root / bug.name.replace(" ", "_").replace("__", "")
    csrc.mkdir()
    for path in emu.CSRC.iterdir():
        if path.suffix in (".h", ".cuh"):
            shutil.copy(path, csrc / path.name)
    kernels = csrc / "fromage_kernels.cuh"
    text = kernels.read_text()
    assert text.count(bug.old) == 1, f"the code this bug is planted in changed: {bug.old!r}"
    kernels.write_text(text.replace(bug.old, bug.new))
    return csrc


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Harness builds of the planted copies (cached like any build), two at a time."""
    root = tmp_path_factory.mktemp("planted")
    sources = {bug.name: _planted_sources(root, bug) for bug in PLANTED}
    buildable = [bug for bug in PLANTED if emu.unsupported(bug.build) is None]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {bug.name: pool.submit(emu.build, bug.build, sources[bug.name]) for bug in buildable}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("bug", PLANTED, ids=[b.name for b in PLANTED])
def test_planted_bug_is_caught(planted, bug):
    if bug.name not in planted:
        pytest.skip(emu.unsupported(bug.build))
    group = groups.make_group(groups.FORMATS[bug.fmt], bug.alignment, sizes=bug.sizes, seed=70)
    job = emu.Job(slots=2, order="forward")
    groups.add_step(job, group)
    result = job.run(planted[bug.name])
    problems = groups.check(group, result)
    assert problems, f"{bug.name}: not caught"
    got = result.report or "result"
    assert got == bug.caught_by, f"{bug.name}: caught by {got}, not {bug.caught_by}: {problems[0][:3000]}"
