"""LARS's CUDA kernels (csrc/rule_lars.h in the engine's pass kernel) executed on the CPU under the
stand-in runtime and AddressSanitizer + UndefinedBehaviorSanitizer, as test_cuda_emulated.py runs
Fromage's.

A group of tensors around the kernels' block size (empty ones, one with a null address; one with
‖p‖ = 0, one with ‖g‖ = 0), views aligned or not, momentum buffers started and not: the stats pass
against float64 sums, and both apply passes (with the buffer list and without it) bit for bit
against the C++ CPU kernels run on the same inputs and the same sums (one function computes the
coefficients for both, and each operation is rounded once in the same order), with found_inf set
first (nothing may change). Scheduling must not change a bit.
"""
import numpy as np
import pytest
import torch

import _cuda_emu as emu
import _emulated_groups as groups
from _native import require_native
from fromage_fused.rules.lars.flags import ADAPT, MOMENTUM, MONITOR, NESTEROV, TRUST_CLIP
from tolerances import EMULATED_STATS_RTOL

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++20 compiler (g++ >= 11 or clang++ >= 14)")

#: (flags, hyper-parameters lr, momentum, dampening, weight_decay, trust_coeff, eps)
CASES = {
    "momentum-clip": (ADAPT | MOMENTUM | TRUST_CLIP, (0.5, 0.9, 0.3, 1e-2, 0.02, 1e-8)),
    "nesterov": (ADAPT | MOMENTUM | NESTEROV, (0.1, 0.9, 0.0, 1e-4, 0.001, 1e-8)),
    "no-momentum": (ADAPT, (0.1, 0.0, 0.0, 5e-4, 0.001, 1e-3)),
    "plain-momentum": (MOMENTUM, (0.05, 0.9, 0.1, 0.0, 0.001, 1e-8)),
    # monitored: the update also sums ‖u‖² (kernel passes 3 and 4)
    "monitored-momentum": (ADAPT | MOMENTUM | TRUST_CLIP | MONITOR, (0.5, 0.9, 0.3, 1e-2, 0.02, 1e-8)),
    "monitored-no-momentum": (ADAPT | MONITOR, (0.1, 0.0, 0.0, 5e-4, 0.001, 1e-3)),
}
GRAD_SCALE = 1024.0


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
    bufs = [(rng.standard_normal(x.size) * 1e-3).astype(np.float32) for x in group.p]
    started = np.array([t % 2 for t in range(group.n)], dtype=np.float32)
    return group, bufs, started


def _job(group, bufs, started, flags, hyper, *, slots=3, order="shuffle", seed=0, sr_seed=None):
    fmt, momentum = group.fmt, bool(flags & MOMENTUM)
    job = emu.Job(slots=slots, order=order, seed=seed)
    seed_buf = None if sr_seed is None else job.buffer(emu.pack_i64(sr_seed))
    views = []
    for t in range(group.n):
        lead_p, lead_g = group.leads(t)
        if group.null[t]:
            views.append([emu.View(None, 0, 0, fmt.itemsize)] * 2 + [emu.View(None, 0, 0, 4)])
            continue
        views.append([emu.View(job.buffer(group.p[t], lead=lead_p, name=f"p{t}"), 0, group.p[t].size, fmt.itemsize),
                      emu.View(job.buffer(group.g[t], lead=lead_g, name=f"g{t}"), 0, group.g[t].size, fmt.itemsize),
                      emu.View(job.buffer(bufs[t], lead=4 * (t % 2), name=f"buf{t}"), 0, bufs[t].size, 4)])
    two = [len(views)] + [w for p, g, _ in views for w in (p.ptr(), g.ptr(), p.numel)]
    three = [len(views)] + [w for p, g, b in views for w in (p.ptr(), b.ptr(), g.ptr(), p.numel)]
    hyper_buf = job.buffer(np.array(hyper, dtype=np.float32))
    gs = groups.scalar(job, GRAD_SCALE)
    sums = job.buffer(2 * 4 * group.n, name="sums") if flags & ADAPT else job.buffer(np.zeros(2 * group.n, np.float32))
    # Every pass gets the per-tensor scalars the flags call for, as the engine passes them.
    started_buf = job.buffer(started, name="started") if momentum else None
    if flags & ADAPT:
        job.launch("lars", 0, fmt.code, flags, hyper_buf, None, sums, None, started_buf, gs, None, None, *two)
    job.dump(sums, "sums")
    apply_pass, tensors = (1, three) if momentum else (2, two)
    moved = None
    if flags & MONITOR:
        apply_pass += 2
        moved = job.buffer(4 * group.n, name="moved")
    for found_inf in (1.0, 0.0):
        job.launch("lars", apply_pass, fmt.code, flags, hyper_buf, sums, moved, None, started_buf, gs,
                   groups.scalar(job, found_inf), seed_buf, *tensors)
        for t in range(group.n):
            if not group.null[t]:
                job.dump(f"p{t}", f"p{t}-{found_inf}")
                job.dump(f"buf{t}", f"buf{t}-{found_inf}")
    if moved is not None:
        job.dump(moved, "moved")
    return job


def _cpu_step(group, bufs, started, flags, hyper, sums, sr_seed=None):
    """The C++ CPU kernels' apply pass on the same inputs and sums."""
    require_native()
    fmt, momentum = group.fmt, bool(flags & MOMENTUM)
    p = [groups.as_tensor(x, fmt) for x in group.p]
    g = [groups.as_tensor(x, fmt) for x in group.g]
    b = [torch.from_numpy(x.copy()) for x in bufs]
    writes = p + b if momentum else p
    scalars = [torch.from_numpy(started.copy())] if momentum else []
    seed = None if sr_seed is None else torch.tensor(sr_seed, dtype=torch.int64)
    moved = torch.ops.fromage_fused.pass_("lars", 1, writes, g, torch.from_numpy(sums.copy()), torch.tensor(hyper),
                                          flags, scalars, None, None, torch.tensor(GRAD_SCALE), seed, 0)
    return p, b, moved


def _problems(group, bufs, started, flags, hyper, result, sr_seed=None):
    if result.report is not None:
        return [f"{result.report} report (exit {result.returncode}): {result.stderr[-4000:]}"]
    fmt, problems = group.fmt, []
    sums = np.frombuffer(result.dumps["sums"], dtype=np.float32).reshape(group.n, 2).copy()
    if flags & ADAPT:
        for t in range(group.n):
            for k, x in enumerate((group.p[t], group.g[t])):
                w = groups.widen(x, fmt).astype(np.float64)
                want = float(np.dot(w, w))
                if abs(sums[t, k] - want) > EMULATED_STATS_RTOL * want:
                    problems.append(f"tensor {t}: sum {k} is {sums[t, k]}, float64 says {want}")
    p_want, b_want, moved = _cpu_step(group, bufs, started, flags, hyper, sums, sr_seed)
    if flags & MONITOR:
        got = np.frombuffer(result.dumps["moved"], dtype=np.float32)
        for t in range(group.n):
            want = float(moved[t, 0])
            if abs(got[t] - want) > EMULATED_STATS_RTOL * want:
                problems.append(f"tensor {t}: the monitor's ‖u‖² is {got[t]}, the CPU kernels' {want}")
    for t in range(group.n):
        if group.null[t]:
            continue
        skipped = groups.from_bytes(result.dumps[f"p{t}-1.0"], fmt)
        if not np.array_equal(skipped, group.p[t]) or result.dumps[f"buf{t}-1.0"] != bufs[t].tobytes():
            problems.append(f"tensor {t}: found_inf changed it")
        got = groups.from_bytes(result.dumps[f"p{t}-0.0"], fmt)
        if not groups.same_bits(got, groups.as_stored(p_want[t], fmt)).all():
            problems.append(f"tensor {t}: parameter differs from the CPU kernels' in "
                            f"{int((~groups.same_bits(got, groups.as_stored(p_want[t], fmt))).sum())} elements")
        got_b = np.frombuffer(result.dumps[f"buf{t}-0.0"], dtype=np.float32)
        want_b = b_want[t].numpy() if flags & MOMENTUM else bufs[t]
        if not groups.same_bits(got_b, want_b).all():
            problems.append(f"tensor {t}: momentum buffer differs from the CPU kernels'")
    return problems


@pytest.mark.parametrize("alignment", groups.ALIGNMENTS)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_lars_step_is_the_cpu_kernels_step(asan, case, fmt, alignment):
    flags, hyper = CASES[case]
    seed = list(CASES).index(case) * 100 + ["fp32", "bf16", "fp16"].index(fmt) * 10 + groups.ALIGNMENTS.index(alignment)
    group, bufs, started = _inputs(groups.FORMATS[fmt], alignment, seed)
    result = _job(group, bufs, started, flags, hyper, seed=seed).run(asan)
    problems = _problems(group, bufs, started, flags, hyper, result)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", ["momentum-clip", "no-momentum"])
def test_a_lars_step_rounds_stochastically_as_the_cpu_kernels(asan, case):
    flags, hyper = CASES[case]
    group, bufs, started = _inputs(groups.FORMATS["bf16"], "mixed", 5)
    result = _job(group, bufs, started, flags, hyper, seed=5, sr_seed=123456789).run(asan)
    problems = _problems(group, bufs, started, flags, hyper, result, sr_seed=123456789)
    assert not problems, "\n".join(problems)


def test_lars_results_do_not_depend_on_scheduling(asan):
    flags, hyper = CASES["momentum-clip"]
    group, bufs, started = _inputs(groups.FORMATS["bf16"], "mixed", 7)
    runs = [_job(group, bufs, started, flags, hyper, slots=slots, order=order, seed=3).run(asan)
            for slots, order in [(1, "forward"), (4, "reverse"), (3, "shuffle")]]
    assert all(r.report is None for r in runs), [r.stderr[-2000:] for r in runs]
    assert runs[0].dumps == runs[1].dumps == runs[2].dumps
