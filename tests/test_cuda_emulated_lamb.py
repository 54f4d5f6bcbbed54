"""LAMB's CUDA kernels (csrc/rule_lamb.h in the engine's pass kernel) executed on the CPU under the
stand-in runtime and AddressSanitizer + UndefinedBehaviorSanitizer, as test_cuda_emulated.py runs
Fromage's.

A group of tensors around the kernels' block size (empty ones, one with a null address, a zero
tensor and a zero gradient), views aligned or not, moments of a step before: every kernel pass a
set of options runs (the global gradient norm, the moments with and without the parameters and
with and without caution, the update with and without the caution mask, Adam in one pass). The
gradient norm against float64; the moments' sums against the C++ CPU kernels' (other orders of
summation: ``EMULATED_STATS_RTOL``); the moments and parameters bit for bit against the C++ CPU
kernels run on the same inputs (and the apply pass on the same sums); found_inf first (nothing may
change).
"""
import numpy as np
import pytest
import torch

import _cuda_emu as emu
import _emulated_groups as groups
from _native import require_native
from fromage_fused.rules.lamb.flags import (ADAPT, BIAS_CORRECTION, CAUTION, CLIP, DECOUPLED_DECAY, GRAD_AVERAGING,
                                            MONITOR, NORMS, PLAIN, TRUST_CLIP)
from tolerances import EMULATED_STATS_RTOL

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++20 compiler (g++ >= 11 or clang++ >= 14)")

GRAD_SCALE = 1024.0
#: lr, beta1, beta2, eps, weight_decay, max_grad_norm, max_lr_snapshot (Spec.pack's order)
HYPER = {"coupled": (0.01, 0.9, 0.999, 1e-6, 0.1, 1.0, 0.01), "decoupled": (0.01, 0.9, 0.999, 1e-6, 0.1, 1.0, 0.01),
         "no-decay": (0.01, 0.9, 0.999, 1e-6, 0.0, 1.0, 0.01)}
#: the gradients' divisor, 1 - b1^t, sqrt(1 - b2^t), the decoupled decay's factor, 1 - b1, 1 - b2 (t = 3)
GLOBALS = (GRAD_SCALE * 1.5, 1 - 0.9 ** 3, (1 - 0.999 ** 3) ** 0.5, 0.01 * 0.1, 0.1, 1 - 0.999)
STD = BIAS_CORRECTION | GRAD_AVERAGING
#: name: (flags, hyper-parameters): the kernel passes each runs follow from the flags
CASES = {
    "adapt-caution-clip": (STD | ADAPT | NORMS | CAUTION | CLIP, "coupled"),
    "adapt-decoupled": (STD | ADAPT | NORMS | DECOUPLED_DECAY | TRUST_CLIP, "decoupled"),
    # the monitor's <u, p>, with and without caution's mask
    "monitored-decoupled": (STD | ADAPT | NORMS | DECOUPLED_DECAY | MONITOR, "decoupled"),
    "monitored-caution-decoupled": (STD | ADAPT | NORMS | CAUTION | DECOUPLED_DECAY | MONITOR, "decoupled"),
    "caution-only": (GRAD_AVERAGING | NORMS | CAUTION, "no-decay"),
    "adam": (STD | PLAIN | CLIP, "no-decay"),
}
FORMATS = ["fp32", "bf16", "fp16"]


@pytest.fixture(scope="module")
def asan():
    why = emu.unsupported("asan")
    if why is not None:
        pytest.skip(why)
    return emu.build("asan")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """The checks' torch ops on one thread: the harness's workers use the cores."""


def _inputs(fmt, alignment, seed):
    group = groups.make_group(fmt, alignment, seed=seed)
    rng = np.random.default_rng(seed + 1)
    m = [(rng.standard_normal(x.size) * 1e-3).astype(np.float32) for x in group.p]
    v = [(rng.standard_normal(x.size) * 1e-3).astype(np.float32) ** 2 for x in group.p]
    return group, m, v


def _passes(flags):
    """The kernel passes of a step under ``flags``: (kernel pass, the rule's pass, list names)."""
    out = [(0, 0, ("g",))] if flags & CLIP else []
    if flags & NORMS:
        moments = (6 if flags & CAUTION else 1) if flags & ADAPT else 2
        out.append((moments, 1, ("m", "v", "p", "g") if flags & ADAPT else ("m", "v", "g")))
        out.append((4, 2, ("p", "m", "v", "g")) if flags & CAUTION else (3, 2, ("p", "m", "v")))
    else:
        out.append((5, 3, ("p", "m", "v", "g")))
    return out


def _job(group, m, v, flags, hyper, *, seed=0, sr_seed=None):
    fmt = group.fmt
    job = emu.Job(slots=3, order="shuffle", seed=seed)
    seed_buf = None if sr_seed is None else job.buffer(emu.pack_i64(sr_seed))
    views = []
    for t in range(group.n):
        lead_p, lead_g = group.leads(t)
        if group.null[t]:
            views.append({k: emu.View(None, 0, 0, fmt.itemsize if k in "pg" else 4) for k in "pgmv"})
            continue
        views.append({"p": emu.View(job.buffer(group.p[t], lead=lead_p, name=f"p{t}"), 0, group.p[t].size,
                                    fmt.itemsize),
                      "g": emu.View(job.buffer(group.g[t], lead=lead_g, name=f"g{t}"), 0, group.g[t].size,
                                    fmt.itemsize),
                      "m": emu.View(job.buffer(m[t], lead=4 * (t % 2), name=f"m{t}"), 0, m[t].size, 4),
                      "v": emu.View(job.buffer(v[t], lead=4 * (t % 3 == 1), name=f"v{t}"), 0, v[t].size, 4)})
    hyper_buf = job.buffer(np.array(HYPER[hyper], dtype=np.float32))
    globals_buf = job.buffer(np.array(GLOBALS, dtype=np.float32))
    gs = groups.scalar(job, GRAD_SCALE)
    sums_in = None
    for kernel, _, names in _passes(flags):
        tensors = [group.n] + [w for view in views for w in [view[k].ptr() for k in names] + [view["p"].numel]]
        writes = kernel != 0
        out = None
        if kernel in (0, 1, 2, 6):
            width = 1 if kernel == 0 else 5
            out = job.buffer(width * 4 * group.n, name=f"sums{kernel}")
        runs = (1.0, 0.0) if writes else (None,)
        for found_inf in runs:
            job.launch("lamb", kernel, fmt.code, flags, hyper_buf, sums_in, out, None if kernel == 0 else globals_buf,
                       None, gs, None if found_inf is None else groups.scalar(job, found_inf),
                       seed_buf if kernel in (3, 4) else None, *tensors)
            if writes:
                for t in range(group.n):
                    if not group.null[t]:
                        for k in "pmv":
                            job.dump(f"{k}{t}", f"{k}{t}-{kernel}-{found_inf}")
        if out is not None:
            job.dump(out, f"sums{kernel}")
            if kernel != 0:
                sums_in = out
    return job


def _cpu(rule_pass, lists, writes, sums, flags, hyper, sr_seed=None):
    out = torch.ops.fromage_fused.pass_("lamb", rule_pass, [t for x in lists[:writes] for t in x],
                                        [t for x in lists[writes:] for t in x], sums,
                                        torch.tensor(HYPER[hyper], dtype=torch.float32), flags, [],
                                        torch.tensor(GLOBALS, dtype=torch.float32), None,
                                        torch.tensor(GRAD_SCALE),
                                        None if sr_seed is None else torch.tensor(sr_seed, dtype=torch.int64), 0)
    return out


def _problems(group, m, v, flags, hyper, result, sr_seed=None):
    if result.report is not None:
        return [f"{result.report} report (exit {result.returncode}): {result.stderr[-4000:]}"]
    require_native()
    fmt, problems = group.fmt, []
    live = [t for t in range(group.n) if not group.null[t]]
    state = {"p": [groups.as_tensor(x, fmt) for x in group.p], "g": [groups.as_tensor(x, fmt) for x in group.g],
             "m": [torch.from_numpy(x.copy()) for x in m], "v": [torch.from_numpy(x.copy()) for x in v]}
    for kernel, rule_pass, names in _passes(flags):
        if kernel == 0:
            got = np.frombuffer(result.dumps["sums0"], dtype=np.float32)
            for t in live:
                g = groups.widen(group.g[t], fmt).astype(np.float64) / GRAD_SCALE
                want = float(np.dot(g, g))
                if abs(got[t] - want) > EMULATED_STATS_RTOL * want:
                    problems.append(f"tensor {t}: ||g||^2 is {got[t]}, float64 says {want}")
            continue
        writes = 1 if kernel in (3, 4) else 3 if kernel == 5 else 2
        sums = None
        if kernel in (3, 4):
            moments = (6 if flags & CAUTION else 1) if flags & ADAPT else 2
            sums = torch.from_numpy(np.frombuffer(result.dumps[f"sums{moments}"],
                                                  dtype=np.float32).reshape(group.n, 5).copy())
        before = {k: [x.clone() for x in state[k]] for k in "pmv"}
        cpu_sums = _cpu(rule_pass, [state[k] for k in names], writes, sums, flags, hyper,
                        sr_seed if kernel in (3, 4) else None)
        for t in live:
            for k in "pmv":
                unchanged = groups.as_stored(before[k][t], fmt) if k == "p" else before[k][t].numpy()
                if result.dumps[f"{k}{t}-{kernel}-1.0"] != unchanged.tobytes():
                    problems.append(f"kernel pass {kernel}, tensor {t}: found_inf changed {k}")
                got = groups.from_bytes(result.dumps[f"{k}{t}-{kernel}-0.0"], fmt) if k == "p" else \
                    np.frombuffer(result.dumps[f"{k}{t}-{kernel}-0.0"], dtype=np.float32)
                want = groups.as_stored(state[k][t], fmt) if k == "p" else state[k][t].numpy()
                if not groups.same_bits(got, want).all():
                    problems.append(f"kernel pass {kernel}, tensor {t}: {k} differs from the CPU kernels' in "
                                    f"{int((~groups.same_bits(got, want)).sum())} of {want.size} elements")
        if kernel in (1, 2, 6):
            got = np.frombuffer(result.dumps[f"sums{kernel}"], dtype=np.float32).reshape(group.n, 5)
            want = cpu_sums.numpy()
            for t in live:
                scale = np.abs(want[t]).sum() + 1e-30
                if np.abs(got[t] - want[t]).max() > EMULATED_STATS_RTOL * scale:
                    problems.append(f"kernel pass {kernel}, tensor {t}: sums {got[t]} against the CPU's {want[t]}")
    return problems


@pytest.mark.parametrize("alignment", groups.ALIGNMENTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_lamb_step_is_the_cpu_kernels_step(asan, case, fmt, alignment):
    flags, hyper = CASES[case]
    seed = list(CASES).index(case) * 100 + FORMATS.index(fmt) * 10 + groups.ALIGNMENTS.index(alignment)
    group, m, v = _inputs(groups.FORMATS[fmt], alignment, seed)
    result = _job(group, m, v, flags, hyper, seed=seed).run(asan)
    problems = _problems(group, m, v, flags, hyper, result)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", ["adapt-caution-clip", "adapt-decoupled"])
def test_a_lamb_update_rounds_stochastically_as_the_cpu_kernels(asan, case):
    flags, hyper = CASES[case]
    group, m, v = _inputs(groups.FORMATS["bf16"], "mixed", 9)
    result = _job(group, m, v, flags, hyper, seed=9, sr_seed=987654321).run(asan)
    problems = _problems(group, m, v, flags, hyper, result, sr_seed=987654321)
    assert not problems, "\n".join(problems)
