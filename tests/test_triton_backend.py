"""The triton backend against the float64 oracle and its own promises (launches, no sync, tables).

On a machine without CUDA the kernels run under Triton's interpreter (``_triton_interpreter``).
Sizes stay small because the interpreter runs programs one after another in Python.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fromage_fused.rules.fromage import phases

pytest.importorskip("triton")

import _triton_interpreter  # noqa: E402,F401  (before anything imports the kernels)

from _oracle import compare_with_oracle  # noqa: E402
from tolerances import ORACLE_TOL  # noqa: E402

import fromage_fused  # noqa: E402
from fromage_fused import functional  # noqa: E402
from fromage_fused.functional import UNSET_MAX_NORM
from fromage_fused.engine.rounding import stochastic_round_bf16  # noqa: E402
from fromage_fused.backends import triton as triton_backend  # noqa: E402
from fromage_fused.engine import capture  # noqa: E402
from _host_reads import forbid_host_reads  # noqa: E402

BACKEND = triton_backend.BACKEND
LOW_PRECISION = (torch.bfloat16, torch.float16)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _need(device):
    reason = BACKEND.unavailable_reason(torch.device(device))
    if reason is not None:
        pytest.skip(f"triton backend unavailable on {device}: {reason}")
    return device


def _one_step(params, grads, *, max_norms=None, backend="triton", **kw):
    functional.fromage(params, grads, max_norms, backend=backend, **kw)


def _reference_of(params, grads, max_norms=None, **kw):
    """The reference backend's step from the same values, in float64 on the CPU."""
    p64 = [p.detach().to("cpu", torch.float64, copy=True) for p in params]
    g64 = [g.detach().to("cpu", torch.float64) for g in grads]
    m = None if max_norms is None else [x.detach().cpu().clone() for x in max_norms]
    functional.fromage(p64, g64, m, backend="reference", **kw)
    return p64, m


def _assert_step_close(got, want, dtype, what=""):
    atol, rtol = ORACLE_TOL[dtype]["step"]
    for i, (g, w) in enumerate(zip(got, want)):
        g = g.detach().to("cpu", torch.float64)
        scale = w.abs().max().item() if w.numel() else 0.0
        torch.testing.assert_close(g, w, atol=atol + rtol * scale, rtol=0, msg=lambda m: f"{what} tensor {i}: {m}")


# -- the oracle ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p_bound", [None, 1.0])
def test_matches_oracle(device, dtype, p_bound):
    # MIXED_SHAPES: odd sizes 1, 3, 4097 (more than one interpreter chunk), an empty tensor, a
    # zero-initialised bias, None and all-zero gradients.
    compare_with_oracle("triton", dtype, device=_need(device), steps=8, p_bound=p_bound, tol=ORACLE_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_oracle_maximize(device):
    compare_with_oracle("triton", torch.float32, device=_need(device), steps=6, p_bound=1.0, maximize=True,
                        tol=ORACLE_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_many_chunks_per_tensor(device):
    # A small chunk cuts every tensor into many programs whose partials the reduce kernel adds.
    backend = triton_backend.TritonBackend(triton_backend.Config(block=16, chunk=64))
    shapes = [(1,), (3,), (64,), (65,), (0,), (300,), (17, 13)]
    compare_with_oracle(backend, torch.float32, device=_need(device), steps=3, p_bound=1.0, shapes=shapes,
                        tol=ORACLE_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_large_tensors_take_large_chunks(device):
    # Tensors of at least 4 large chunks are cut into large chunks, the others into small ones.
    cfg = triton_backend.Config(block=16, chunk=64, large_chunk=256)
    sizes = [1023, 1024, 3001, 5, 0, 17 * 61]
    values, programs = triton_backend.layout_values(sizes, cfg)
    n = len(sizes)
    chunks, counts = values[3 * n:4 * n], values[2 * n:3 * n]
    assert chunks == [64, 256, 256, 64, 64, 256]
    assert counts == [16, 4, 12, 1, 1, 5] and programs == sum(counts) == len(values) - 4 * n
    shapes = [(s,) for s in sizes[:-1]] + [(17, 61)]
    compare_with_oracle(triton_backend.TritonBackend(cfg), torch.float32, device=_need(device), steps=3, p_bound=1.0,
                        shapes=shapes, tol=ORACLE_TOL[torch.float32])


def test_configs_keep_chunks_multiples_of_the_block():
    # The kernels promise the compiler that every chunk starts at a multiple of BLOCK elements.
    for cfg in list(triton_backend.CUDA_CONFIGS.values()) + [triton_backend.INTERPRETER_CONFIG]:
        assert cfg.chunk % cfg.block == 0 and (cfg.large_chunk or cfg.block) % cfg.block == 0
    with pytest.raises(ValueError, match="multiple of block"):
        triton_backend.Config(block=16, chunk=64, large_chunk=100)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_in_one_group(device):
    shapes = [((k * 7) % 11 + 1,) for k in range(320)]
    compare_with_oracle("triton", torch.float32, device=_need(device), steps=2, p_bound=1.0, shapes=shapes,
                        tol=ORACLE_TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_call(device):
    device = _need(device)
    gen = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float64]
    src = [torch.randn(37 + i, generator=gen, dtype=torch.float64) for i in range(len(dtypes))]
    gsrc = [torch.randn(37 + i, generator=gen, dtype=torch.float64) for i in range(len(dtypes))]
    params = [s.to(device, d) for s, d in zip(src, dtypes)]
    grads = [s.to(device, d) for s, d in zip(gsrc, dtypes)]
    mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params]
    want, want_mn = _reference_of(params, grads, mn, lr=0.03, p_bound=0.9)
    groups = functional.plan(params, grads, mn, backend="triton", p_bound=0.9)
    # float64 is not a triton dtype: its group falls back to foreach.
    assert {(g.dtype, g.backend.name) for g in groups} == {
        (torch.float32, "triton"), (torch.bfloat16, "triton"), (torch.float16, "triton"), (torch.float64, "foreach")}
    _one_step(params, grads, max_norms=mn, lr=0.03, p_bound=0.9)
    for i, d in enumerate(dtypes):
        _assert_step_close([params[i]], [want[i]], d if d in ORACLE_TOL else torch.float32, f"{d}")
    torch.testing.assert_close(torch.stack([m.cpu() for m in mn]), torch.stack(want_mn), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_complex_through_real_views(device):
    device = _need(device)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(6, 5, generator=gen, dtype=torch.complex128).to(device, torch.complex64)]
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.complex128).to(device, torch.complex64)]
    want = [torch.view_as_real(params[0]).to("cpu", torch.float64, copy=True)]
    functional.fromage(want, [torch.view_as_real(grads[0]).to("cpu", torch.float64)], None, lr=0.05,
                       backend="reference")
    _one_step(params, grads, lr=0.05)
    _assert_step_close([torch.view_as_real(params[0])], want, torch.float32, "complex64")


# -- memory layouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_views(device, dtype):
    # Views starting at element 1 are not 16-byte aligned: the kernels must take the unhinted path.
    device = _need(device)
    base_p = torch.randn(1 + 5000, dtype=torch.float64).to(device, dtype)
    base_g = torch.randn(3 + 5000, dtype=torch.float64).to(device, dtype)
    params = [base_p[1:4098], base_p[4099:4102], base_p[4200:4201]]
    grads = [base_g[3:4100], base_g[1:4], base_g[4400:4401]]
    assert params[0].data_ptr() % 16 and grads[0].data_ptr() % 16
    untouched = base_p[4102:4200].clone()
    want, _ = _reference_of(params, grads, lr=0.02)
    _one_step(params, grads, lr=0.02)
    _assert_step_close(params, want, dtype, "unaligned")
    assert torch.equal(base_p[4102:4200], untouched)


def test_aligned_flags_follow_data_ptr():
    base = torch.zeros(64)
    aligned, shifted = base[:8], base[1:9]
    values, paths = triton_backend.address_values([(aligned.data_ptr(), shifted.data_ptr()),
                                                   (aligned.data_ptr(), aligned.data_ptr())])
    assert values[4:] == [1, 0] and paths == 3  # both paths in one group


def test_equally_misaligned_views_get_a_head_and_the_aligned_path():
    # Flag bit 0: p + head and g + head 16-byte aligned; the head (elements) in the bits above.
    base = torch.zeros(64)
    for itemsize, dtype in ((4, torch.float32), (2, torch.bfloat16)):
        base = torch.zeros(64, dtype=dtype)
        views = [base[k:k + 8] for k in range(16 // itemsize)]
        ptrs = [v.data_ptr() for v in views]
        values, paths = triton_backend.address_values([ptrs, ptrs], [itemsize, itemsize])
        heads = [(-ptr % 16) // itemsize for ptr in ptrs]
        assert values[2 * len(ptrs):] == [1 | h << 1 for h in heads] and paths == 1
        # Misaligned differently: no vectors for that tensor.
        values, paths = triton_backend.address_values([ptrs[1:2], ptrs[2:3]], [itemsize, itemsize])
        assert values[2:] == [0] and paths == 2
        # A tensor shorter than its head is all head: the head block ends at its end.
        values, paths = triton_backend.address_values([ptrs[1:2], ptrs[1:2]], [itemsize, itemsize], [1])
        assert values[2:] == [1 | 1 << 1] and paths == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offsets", [(1, 1), (3, 3), (1, 0), (0, 2)], ids=["same1", "same3", "mixed", "mixed2"])
def test_views_at_any_offset_step_like_the_reference(dtype, offsets):
    # Chunks shifted by the head, the head itself in the first chunk, masked tails only where there
    # are some: every element once, against the float64 reference. Tensors shorter than their head
    # (1 and 2 elements at offset 1: head 3) end inside it.
    cfg = triton_backend.INTERPRETER_CONFIG
    sizes = [2 * cfg.chunk + 5, cfg.block, 3, 0, cfg.chunk, 1, 2]
    room = sum(sizes) + 32 * len(sizes) + 64
    base_p = torch.randn(room, dtype=torch.float64).to(dtype)
    base_g = torch.randn(room, dtype=torch.float64).to(dtype)
    params, grads, at = [], [], 16
    for size in sizes:
        params.append(base_p[at + offsets[0]:at + offsets[0] + size])
        grads.append(base_g[at + offsets[1]:at + offsets[1] + size])
        at += size + 16
    before = base_p.clone()
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params]
    want, want_mn = _reference_of(params, grads, mn, lr=0.03, p_bound=1.0)
    _one_step(params, grads, max_norms=mn, lr=0.03, p_bound=1.0)
    _assert_step_close(params, want, dtype, f"offsets {offsets}")
    torch.testing.assert_close(torch.stack(mn), torch.stack(want_mn))
    # Nothing outside the views changed.
    inside = torch.zeros(base_p.numel(), dtype=torch.bool)
    for v in params:
        if v.numel():
            first = (v.data_ptr() - base_p.data_ptr()) // v.element_size()
            inside[first:first + v.numel()] = True
    assert torch.equal(base_p[~inside], before[~inside])


def test_masked_tail_runs_only_where_a_chunk_has_one(monkeypatch):
    # Under the interpreter the kernels' helpers are Python functions: count the masked passes.
    from fromage_fused.kernels import engine_pass

    calls = []
    real = engine_pass._block

    def counting(*args):
        if args[-5] == 1:  # W: the update pass
            calls.append(bool(args[-2]))  # MASKED
        return real(*args)

    monkeypatch.setattr(engine_pass, "_block", counting)
    cfg = triton_backend.INTERPRETER_CONFIG
    params = [torch.randn(cfg.chunk * 2), torch.randn(cfg.chunk + 7)]  # 3 full chunks, 1 with a tail
    grads = [torch.randn_like(p) for p in params]
    _one_step(params, grads, lr=0.01)
    assert sum(calls) == 1, f"{sum(calls)} masked passes for one tail"


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """The probe's counts of the kernels compiled for sm_90 (no GPU needed): ``{variant: {kernel: counts}}``."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = os.path.join(os.path.dirname(__file__), "_triton_ptx_probe.py")
    out = {}
    for variant, args in {"both": [], "no_aligned_path": ["--no-aligned-path"],
                          "unaligned_only": ["--paths", "2"]}.items():
        # A cache per variant: older Triton (3.2) keys its cache without the patched global of
        # --no-aligned-path, and would hand that variant the kernel compiled with both paths.
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
        done = subprocess.run([sys.executable, probe, *args], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


#: kernels that write nothing (their sums are stored as scalars)
READ_ONLY = ("partials", "lars_stats", "lamb_grad_norm")


def test_sm90_code_vectorises_the_aligned_path(sm90):
    for kernel, c in sm90["both"].items():
        if c["per_thread"] < 8:
            # A pass of three or four lists runs smaller blocks, to stay within 64 registers: its
            # threads move 2 or 4 elements per operand and block, in vectors of 8 bytes or less.
            assert c["ld_v"] >= 1, f"{kernel}: no vector loads on the aligned path"
            continue
        # Each thread moves 8 elements per operand and block: two 16-byte vectors in fp32, one in
        # bf16/fp16 (BLOCK is chosen per dtype for that).
        vectors = 2 if kernel.endswith("fp32") else 1
        assert c["ld_16"] >= c["lists"] * vectors, f"{kernel}: {c['ld_16']} 16-byte loads on the aligned path"
        assert kernel.startswith(READ_ONLY) or c["st_16"] >= vectors, f"{kernel}: {c['st_16']} 16-byte stores"


@pytest.mark.parametrize("variant", ["no_aligned_path", "unaligned_only"])
def test_sm90_code_has_no_vector_access_off_the_aligned_path(sm90, variant):
    # A misaligned vector access faults on a GPU; the interpreter cannot tell.
    for kernel, c in sm90[variant].items():
        got = {k: c[k] for k in ("ld_v", "st_v", "ld_16", "st_16")}
        assert got == {"ld_v": 0, "st_v": 0, "ld_16": 0, "st_16": 0}, f"{kernel}: vector accesses: {got}"


def test_sm90_unaligned_update_stores_without_shared_memory(sm90):
    # In a kernel with both paths the unaligned loads take the aligned path's layout and every store
    # goes through shared memory; a group with no alignable tensor gets the kernel without it.
    for kernel, c in sm90["unaligned_only"].items():
        if kernel.startswith("apply"):
            assert c["st_shared"] == 0 and c["bar_sync"] == 0, f"{kernel}: {c}"


def test_sm90_kernels_fit_in_64_registers(sm90):
    # 64 or fewer registers: at least four programs of 256 threads per SM (two at 84-105 before).
    for variant, kernels in sm90.items():
        for kernel, c in kernels.items():
            if c["regs"] is None:
                pytest.skip("this Triton ships no cuobjdump to read the cubin with")
            assert c["regs"] <= 64, f"{variant} {kernel}: {c['regs']} registers"


def test_sm90_max_norm_is_read_and_written_without_a_data_race(sm90):
    # Every program reads its tensor's max_norm while the first may write it: a relaxed load
    # (ld.volatile is ld.relaxed.sys in the PTX memory model) and a relaxed atomic exchange.
    for kernel, c in sm90["both"].items():
        if kernel.startswith("apply"):
            assert c["ld_volatile"] == 1 and c["atom_exch"] == 1, f"{kernel}: {c}"


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_tensors(device):
    device = _need(device)
    p_src = torch.randn(9, 12, dtype=torch.float64)
    g_src = torch.randn(12, 9, dtype=torch.float64)
    params = [p_src.to(device, torch.float32).t(), torch.randn(20, dtype=torch.float64).to(device, torch.float32)[::2]]
    grads = [g_src.to(device, torch.float32), torch.randn(10, dtype=torch.float64).to(device, torch.float32)]
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    want, _ = _reference_of(params, grads, lr=0.05)
    _one_step(params, grads, lr=0.05)
    _assert_step_close(params, want, torch.float32, "non-contiguous")


# -- training integration -----------------------------------------------------------------------------------


def _pair(device, dtype=torch.float32):
    """Three tensors: a plain one, one with a zero gradient, a zero one (the fallback branches)."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype) for n in (5, 70, 3)]
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype) for n in (5, 70, 3)]
    grads[1].zero_()
    params[2].zero_()
    return params, grads


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_everything(device):
    device = _need(device)
    params, grads = _pair(device)
    before = [p.clone() for p in params]
    mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params]
    _one_step(params, grads, max_norms=mn, lr=0.1, p_bound=1.0, found_inf=torch.ones((), device=device))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(m.item() == UNSET_MAX_NORM for m in mn)
    want, want_mn = _reference_of(params, grads, mn, lr=0.1, p_bound=1.0)
    _one_step(params, grads, max_norms=mn, lr=0.1, p_bound=1.0, found_inf=torch.zeros((), device=device))
    _assert_step_close(params, want, torch.float32, "found_inf=0")
    torch.testing.assert_close(torch.stack([m.cpu() for m in mn]), torch.stack(want_mn))


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_divides_the_fallback_only(device):
    device = _need(device)
    params, grads = _pair(device)
    # Loss-scaled gradients with their scale step exactly like the unscaled ones: the scaled
    # branch is scale-invariant and the fallback (tensor 2, zero) divides by the scale.
    scale = torch.full((), 1024.0, device=device)
    want, _ = _reference_of(params, grads, lr=0.1)
    scaled_grads = [g * 1024.0 for g in grads]
    _one_step(params, scaled_grads, lr=0.1, grad_scale=scale)
    _assert_step_close(params, want, torch.float32, "grad_scale")
    assert want[2].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_prefactor_off(device):
    device = _need(device)
    params, grads = _pair(device)
    want, _ = _reference_of(params, grads, lr=0.1, prefactor=False)
    _one_step(params, grads, lr=0.1, prefactor=False)
    _assert_step_close(params, want, torch.float32, "prefactor=False")
    assert torch.equal(params[1].cpu(), want[1].float())  # zero gradient, no prefactor: p unchanged


@pytest.mark.parametrize("device", DEVICES)
def test_lr_is_read_from_device_memory(device):
    device = _need(device)
    params, grads = _pair(device)
    copy = [p.clone() for p in params]
    lr = torch.full((), 0.07, device=device)
    functional.fromage(params, grads, None, lr=lr, backend="triton")
    functional.fromage(copy, grads, None, lr=0.07, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(params, copy))


# -- stochastic rounding -----------------------------------------------------------------------------------


def _bits_equal(a, b):
    nan = torch.isnan(a.float())
    assert torch.equal(nan, torch.isnan(b.float()))
    assert torch.equal(a.view(torch.int16)[~nan], b.view(torch.int16)[~nan])


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_kernel_is_the_torch_recipe(device):
    device = _need(device)
    from fromage_fused.kernels.fromage_round import stochastic_round_bf16_kernel

    x = torch.randn(3001, dtype=torch.float64) * 10
    x[5:9] = torch.tensor([float("inf"), float("nan"), -float("inf"), 3.3895e38])
    x[9:12] = torch.tensor([1e-40, -2.0 ** -130, 0.0])
    x = x.float().to(device)
    for seed, t in [(0, 0), (12345, 7), (-5, 3), (2 ** 40 + 17, 299)]:
        s = torch.tensor(seed, dtype=torch.int64, device=device)
        out = torch.empty(x.numel(), dtype=torch.bfloat16, device=device)
        triton_backend._launch(stochastic_round_bf16_kernel, (4,), x, out, s, t, x.numel(), BLOCK=1024)
        _bits_equal(out.cpu(), stochastic_round_bf16(x.cpu(), s.cpu(), t))


@pytest.mark.parametrize("device", DEVICES)
def test_apply_with_sr_seed_rounds_the_fp32_result_exactly(device):
    # The bf16 step with a seed must equal the torch recipe applied to the same step in fp32.
    device = _need(device)
    gen = torch.Generator().manual_seed(5)
    shapes = [(300,), (1,), (4097,), (0,), (7, 5)]
    p16 = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in shapes]
    g16 = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in shapes]
    stats = phases.stats(BACKEND, p16, g16)
    p32 = [p.float() for p in p16]
    g32 = [g.float() for g in g16]
    seed = torch.tensor(20260101, dtype=torch.int64, device=device)
    lr = torch.full((), 0.05, device=device)
    phases.apply(BACKEND, p16, g16, stats, lr=lr, max_norm=None, p_bound=None, maximize=False, sr_seed=seed)
    phases.apply(BACKEND, p32, g32, stats, lr=lr, max_norm=None, p_bound=None, maximize=False)
    for i, (got, exact) in enumerate(zip(p16, p32)):
        _bits_equal(got.cpu(), stochastic_round_bf16(exact.cpu(), seed.cpu(), i))
    # Without a seed the same step rounds to nearest.
    p_near = [torch.randn(s, generator=gen).to(device, torch.bfloat16) for s in shapes]
    p_ref = [p.float() for p in p_near]
    phases.apply(BACKEND, p_near, g16, stats, lr=lr, max_norm=None, p_bound=None, maximize=False)
    phases.apply(BACKEND, p_ref, g32, stats, lr=lr, max_norm=None, p_bound=None, maximize=False)
    for got, exact in zip(p_near, p_ref):
        _bits_equal(got.cpu(), exact.cpu().to(torch.bfloat16))


# -- launches, synchronisation, tables ----------------------------------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    seen = []
    real = triton_backend._launch

    def counting(kernel, grid, *args, **meta):
        seen.append(kernel)
        return real(kernel, grid, *args, **meta)

    monkeypatch.setattr(triton_backend, "_launch", counting)
    return seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 12])
def test_launches_per_group_are_constant(device, launches, n):
    device = _need(device)
    params = [torch.randn(i % 9, device=device) for i in range(n)]
    grads = [torch.randn(i % 9, device=device) for i in range(n)]
    mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params]
    functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend="triton")
    assert len(launches) == 3
    half = [p.half() for p in params]
    functional.fromage(params + half, grads + [g.half() for g in grads], mn + [m.clone() for m in mn],
                       lr=0.01, p_bound=1.0, backend="triton")
    assert len(launches) == 3 + 6  # two groups


@pytest.mark.parametrize("device", DEVICES)
def test_a_plans_table_keys_are_read_once_per_plan_and_follow_a_new_one(device, monkeypatch):
    """Through the optimizer's step plan the parameters' sizes and addresses are read once per plan
    (its lists keep them), the gradients' once per step; a parameter given new storage builds a
    new plan, whose tables carry the new address."""
    device = _need(device)
    backend = triton_backend.TritonBackend()
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in (5, 70, 3)]
    opt = fromage_fused.Fromage(params, lr=0.05, p_bound=1.0, backend="foreach")
    opt._device_backends[torch.device(device)] = backend
    reads = []
    real = triton_backend._numel
    monkeypatch.setattr(triton_backend, "_numel", lambda t: (reads.append(t), real(t))[1])
    twin = [p.detach().clone() for p in params]
    twin_mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params]
    for step in range(4):
        grads = [torch.randn(p.shape, device=device) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()  # new storage every step, as zero_grad() and backward give
        if step == 2:
            params[1].data = torch.randn(70, device=device)  # new storage: a new plan
            twin[1] = params[1].detach().clone()
        opt.step()
        functional.fromage(twin, grads, twin_mn, lr=0.05, p_bound=1.0, backend="reference")
        for got, want in zip(params, twin):
            torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)
    assert len(reads) == 2 * len(params)  # the first plan and the one after the new storage


@pytest.mark.parametrize("device", DEVICES)
def test_no_host_sync_during_step(device):
    device = _need(device)
    params, grads = _pair(device, torch.bfloat16)
    mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params]
    kw = dict(lr=torch.full((), 0.01, device=device), p_bound=1.0, maximize=True, backend="triton",
              found_inf=torch.zeros((), device=device), grad_scale=torch.full((), 8.0, device=device),
              sr_seed=torch.tensor(3, device=device))
    functional.fromage(params, grads, mn, **kw)  # first use: kernel loading may read values
    grads = [g * 2 for g in grads]  # new storages: the table rebuild must not sync either
    with forbid_host_reads():
        functional.fromage(params, grads, mn, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_table_cache_reused_and_rebuilt_on_new_grad_storage(device):
    device = _need(device)
    backend = triton_backend.TritonBackend()
    params, grads = _pair(device)
    mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params]
    functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend=backend)
    built = backend.table_builds
    assert built == 1  # the addresses of the parameters and gradients
    functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend=backend)
    assert backend.table_builds == built
    new_grads = [g.clone() for g in grads]  # what zero_grad(set_to_none=True) + backward gives
    want, _ = _reference_of(params, new_grads, lr=0.01)
    functional.fromage(params, new_grads, None, lr=0.01, backend=backend)
    assert backend.table_builds == built + 1
    _assert_step_close(params, want, torch.float32, "after rebuild")


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_steps_with_new_grad_storage_each_step(device):
    device = _need(device)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(device)
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(device)
    twin.load_state_dict(model.state_dict())
    opts = [fromage_fused.Fromage(m.parameters(), lr=0.05, p_bound=2.0, backend=b)
            for m, b in ((model, "triton"), (twin, "foreach"))]
    x = torch.randn(16, 6, device=device)
    for _ in range(3):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _held(backend):
    return {k for k, t in backend._tables.items() if t.held}


def test_tables_used_under_capture_are_never_evicted(monkeypatch):
    # Graph capture is simulated on the CPU: the bookkeeping is the same as on CUDA.
    monkeypatch.setattr(triton_backend, "_CACHE_SIZE", 4)
    backend = triton_backend.TritonBackend()
    params, grads = _pair("cpu")
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params]
    functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend=backend)  # eager: nothing held
    assert not _held(backend)
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    grads = [g.clone() for g in grads]  # new gradient storage inside the capture: a table miss
    functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend=backend)
    held = _held(backend)
    kinds = sorted(k[0] for k in held)
    assert kinds == ["addrs", "layout"]  # hit under capture (layout) or made there
    monkeypatch.setattr(capture, "capturing", lambda device: False)
    for _ in range(10):  # eager steps with new storage each time: the cache fills and evicts
        grads = [g.clone() for g in grads]
        functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend=backend)
    assert held <= set(backend._tables)
    assert len(backend._tables) == 4
    # The held address table still describes the captured gradients.
    want, _ = _reference_of(params, grads, lr=0.01)
    functional.fromage(params, grads, None, lr=0.01, backend=backend)
    _assert_step_close(params, want, torch.float32, "after eviction")


def test_cache_grows_past_its_size_only_with_held_tables(monkeypatch):
    monkeypatch.setattr(triton_backend, "_CACHE_SIZE", 2)
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    backend = triton_backend.TritonBackend()
    params, grads = _pair("cpu")
    for _ in range(3):
        grads = [g.clone() for g in grads]
        functional.fromage(params, grads, None, lr=0.01, backend=backend)
    assert len(backend._tables) == len(_held(backend)) == 4  # one layout, three address tables


def test_failed_upload_inside_capture_says_what_to_do(monkeypatch):
    backend = triton_backend.TritonBackend()
    params, grads = _pair("cpu")
    monkeypatch.setattr(capture, "capturing", lambda device: True)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton_backend._Table, "__init__", refuse)
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"inside CUDA graph capture.*zero_grad\(set_to_none=False\)"):
        functional.fromage(params, grads, None, lr=0.01, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.gpu
def test_cuda_tables_come_from_pinned_buffers_owned_by_the_entry():
    backend = triton_backend.TritonBackend()
    params, grads = _pair("cuda")
    functional.fromage(params, grads, None, lr=0.01, backend=backend)
    for table in backend._tables.values():
        assert table.host is not None and table.host.is_pinned()
        assert table.device.is_cuda and torch.equal(table.host, table.device.cpu())


def test_empty_group_is_refused_clearly():
    with pytest.raises(ValueError, match="non-empty group"):
        phases.stats(BACKEND, [], [])


def test_tables_need_no_numpy():
    # The CPU torch wheel brings no numpy: importing the backend and building its tables must not
    # need it (running the kernels on CPU does, through Triton's interpreter, but that is for tests).
    code = textwrap.dedent("""
        import sys
        sys.modules["numpy"] = None  # any import of numpy now raises ImportError
        import torch
        from fromage_fused.backends import triton as tb
        backend = tb.TritonBackend()
        params = [torch.randn(n) for n in (5, 0, 3000)]
        grads = [torch.randn_like(p) for p in params]
        layout, addrs = backend._tables_for([params, grads], (torch.float32, torch.float32), tb.INTERPRETER_CONFIG,
                                            tb._Use(torch.device("cpu")))
        assert layout.programs == 1 + 1 + 2, layout.programs
        assert addrs.device.tolist()[:3] == [p.data_ptr() for p in params]
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# -- availability and validation ------------------------------------------------------------------------------


def test_ranks_below_foreach_on_cpu_and_first_on_cuda():
    assert (BACKEND.priority_on(torch.device("cpu"))
            < fromage_fused.backends.get("foreach").priority_on(torch.device("cpu")))
    assert (BACKEND.priority_on(torch.device("cuda"))
            > fromage_fused.backends.get("foreach").priority_on(torch.device("cuda")))
    assert "meta" in BACKEND.unavailable_reason(torch.device("meta"))
    assert not BACKEND.supports_dtype(torch.float64)


def test_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setattr(triton_backend, "_kernels_interpreted", lambda: False)
    assert "TRITON_INTERPRET" in BACKEND.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(triton_backend, "_kernels_interpreted", lambda: True)
    assert "interpreter" in BACKEND.unavailable_reason(torch.device("cuda"))


@pytest.mark.gpu
def test_listed_on_cuda():
    assert "triton" in fromage_fused.available_backends("cuda")
    assert fromage_fused.available_backends("cuda")[0] in ("triton", "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_changes_nothing(device):
    device = _need(device)
    params, grads = _pair(device)
    before = [p.clone() for p in params]
    stats = phases.stats(BACKEND, params, grads)
    with pytest.raises(RuntimeError, match="stats"):
        phases.apply(BACKEND, params, grads, stats[:2], lr=torch.full((), 0.1, device=device), max_norm=None,
                     p_bound=None,
                      maximize=False)
    with pytest.raises(RuntimeError, match="max_norm"):
        phases.apply(BACKEND, params, grads, stats, lr=torch.full((), 0.1, device=device), p_bound=1.0, maximize=False,
                      max_norm=torch.zeros(3, device=device, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        phases.stats(BACKEND, [p.double() for p in params], [g.double() for g in grads])
    with pytest.raises(RuntimeError, match="tensor 1"):
        phases.stats(BACKEND, params, [grads[0], grads[1].half(), grads[2]])
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("size", [2, 16])
def test_table_cache_is_thread_safe(monkeypatch, size):
    # One backend instance serves every optimizer: threads that miss and evict at the same time
    # (new gradient storage every step) must neither corrupt the cache (an eviction iterating over
    # it while another thread inserts) nor lose a table between finding it and using it (a tiny
    # cache), and every table must describe the tensors asked for.
    import threading

    monkeypatch.setattr(triton_backend, "_CACHE_SIZE", size)
    backend = triton_backend.TritonBackend()
    cfg = triton_backend.INTERPRETER_CONFIG
    errors = []

    def work(seed):
        try:
            params = [torch.randn(5 + seed), torch.randn(3)]
            grads = [torch.randn_like(p) for p in params]
            for _ in range(1000):
                grads = [g.clone() for g in grads]
                _, addrs = backend._tables_for([params, grads], (torch.float32, torch.float32), cfg,
                                               triton_backend._Use(torch.device("cpu")))
                got = addrs.device.tolist()
                assert got[:4] == [p.data_ptr() for p in params] + [g.data_ptr() for g in grads], got
        except Exception as exc:  # noqa: BLE001 (any failure in a thread fails the test)
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the windows are hit
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, f"{len(errors)} threads failed, first: {errors[0]!r}"
    assert len(backend._tables) <= size


def test_graph_tables_are_bounded_and_can_be_released(monkeypatch):
    # Each capture on new gradient storage holds a new table for good: past the bound, a capture
    # that needs another refuses before anything changes and says what to do.
    monkeypatch.setattr(triton_backend, "GRAPH_TABLE_LIMIT", 3)
    backend = triton_backend.TritonBackend()
    params, grads = _pair("cpu")
    functional.fromage(params, grads, None, lr=0.01, backend=backend)  # eager: nothing held
    monkeypatch.setattr(triton_backend.capture, "capturing", lambda device: True)
    for _ in range(2):  # the layout table and two address tables
        grads = [g.clone() for g in grads]
        functional.fromage(params, grads, None, lr=0.01, backend=backend)
    assert len(_held(backend)) == 3
    functional.fromage(params, grads, None, lr=0.01, backend=backend)  # held tables are hits
    before = [p.clone() for p in params]
    grads = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match=r"holds 3 tensor tables .*release_graph_tables\(\)"):
        functional.fromage(params, grads, None, lr=0.01, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert backend.release_graph_tables() == 3 and not _held(backend)
    functional.fromage(params, grads, None, lr=0.01, backend=backend)
    assert len(_held(backend)) == 2  # the layout table again, and the new address table


def test_release_graph_tables_reaches_every_backend(monkeypatch):
    monkeypatch.setattr(triton_backend.capture, "capturing", lambda device: True)
    backend = triton_backend.TritonBackend()
    params, grads = _pair("cpu")
    functional.fromage(params, grads, None, lr=0.01, backend=backend)
    assert _held(backend)
    assert fromage_fused.release_graph_tables() >= 2
    assert not _held(backend)


class _FakeStream:
    cuda_stream = 7


def _fake_cuda_use(capturing):
    """A _Use that takes the CUDA path of the table code with CPU tensors (no GPU needed)."""
    use = object.__new__(triton_backend._Use)
    use.device, use.capturing, use.stream = torch.device("cpu"), capturing, _FakeStream()
    return use


def test_uploads_inside_capture_come_from_pinned_memory_set_aside_before(monkeypatch):
    allocations = []

    def allocate(words):
        allocations.append(words)
        return torch.zeros(words, dtype=torch.int64)

    monkeypatch.setattr(triton_backend, "_pinned", allocate)
    monkeypatch.setattr(triton_backend, "_pinned_copy", lambda values: torch.tensor(values, dtype=torch.int64))
    backend = triton_backend.TritonBackend()
    eager = backend._table(("k", 0), _fake_cuda_use(False), lambda: (list(range(10)), 1))
    assert allocations and eager.host.tolist() == list(range(10))  # the pool reserved room, outside capture
    reserved = list(allocations)
    made = [backend._table(("k", i), _fake_cuda_use(True), lambda i=i: ([i] * 100, 1)) for i in range(1, 50)]
    assert allocations == reserved  # nothing allocated inside the capture
    segment = backend._pool._segment
    for i, table in enumerate(made, start=1):
        assert table.held and table.host.tolist() == [i] * 100 and table.device.tolist() == [i] * 100
        assert table.host.untyped_storage().data_ptr() == segment.untyped_storage().data_ptr()
    # Slices are never handed out twice.
    spans = sorted((t.host.data_ptr(), t.host.data_ptr() + 8 * t.host.numel()) for t in made)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_staging_pool_keeps_room_outside_capture_only():
    allocations = []
    pool = triton_backend._StagingPool(allocate=lambda n: allocations.append(n) or torch.zeros(n, dtype=torch.int64),
                                       min_free=100)
    assert pool.take(1) is None and not allocations  # nothing set aside yet: take never allocates
    pool.reserve(30)
    assert allocations == [200] and pool.free() == 200
    assert pool.take(150).numel() == 150 and pool.take(60) is None and pool.free() == 50
    pool.reserve(120)  # 240 wanted free: a new segment
    assert allocations == [200, 480] and pool.free() == 480
    pool.reserve(10)
    assert len(allocations) == 2
