"""docs/backends.md's "Bit-identical results", each promise checked so that no data can pass it by luck.

1. The bf16 roundings (stochastic, and to nearest in the kernels) of equal fp32 values are the same
   bits everywhere, NaN included: checked against the independent model of ``_bit_model`` on every
   class of fp32 value, for torch, C++, Triton and CUDA.
2. From equal stats, the apply phase (coefficients, fp32 update, rounding) of every backend gives the
   same bits as the model: thousands of random and adversarial stats rows, tensors of many sizes
   and scales with NaN, infinities and subnormals, every dtype and option.
3. What makes 2. hold on a GPU where it cannot run here: the compiled Triton and CUDA apply kernels
   contain no fused multiply-add, no approximate division or square root, no flushing to zero.
4. Every backend repeats itself: the same step from the same values gives the same bits.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fromage_fused.rules.fromage import phases

import _triton_interpreter  # noqa: E402,F401  (the triton cases on a machine without CUDA)
import _bit_model as model  # noqa: E402
from conftest import backend_cases  # noqa: E402
from fromage_fused import available_backends, backends, functional  # noqa: E402
from fromage_fused.functional import UNSET_MAX_NORM
from fromage_fused.engine.rounding import nearest_bf16, stochastic_round_bf16  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# The values overflow and make NaNs on purpose; Triton's interpreter computes them with numpy.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")
# (seed, tensor index): zero, small, negative, above 2**32, the int64 extremes, a large index.
SEEDS = [(0, 0), (12345, 7), (-3, 1000), (2**40 + 17, 3), (2**63 - 1, 2**31 - 1), (-(2**63), 65_537)]


def _backends_on(device):
    names = [n for _, n in backend_cases((device,), reference=False)]
    if len(names) < 2:
        pytest.skip(f"fewer than two backends to compare on {device}: {names}")
    return names


def _hard_values(device, seed=0):
    bits = model.hard_fp32_bits(np.random.default_rng(seed))
    return bits, model.as_float_tensor(bits, device)


def _assert_bits(got_bits, want_bits, what, nan_mask=None):
    """Equal bit patterns; with ``nan_mask``, only NaN-ness is compared where it is set."""
    got_bits, want_bits = np.asarray(got_bits), np.asarray(want_bits)
    differ = got_bits != want_bits
    if nan_mask is not None:
        differ &= ~nan_mask
    if differ.any():
        k = np.flatnonzero(differ)
        raise AssertionError(f"{what}: {k.size} of {got_bits.size} differ, first at {k[:5].tolist()}: "
                             f"got {[hex(int(v)) for v in got_bits[k[:5]]]}, want "
                             f"{[hex(int(v)) for v in want_bits[k[:5]]]}")


# -- 1. the roundings ------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_torch_recipes_are_the_model(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bits, x = _hard_values(device)
    for seed, t in SEEDS:
        got = stochastic_round_bf16(x, torch.tensor(seed, device=device), t)
        _assert_bits(model.tensor_bits(got), model.sr_bits(bits, seed, t), f"stochastic_round_bf16 {seed, t}")
    _assert_bits(model.tensor_bits(nearest_bf16(x)), model.rne_bits(bits), "nearest_bf16")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_cast_is_the_nearest_model_except_for_nan_bits(device):
    # The foreach backend rounds bf16 to nearest with torch's cast: the docs promise its bits
    # for every value but NaN. The CPU cast has vector and scalar kernels (the tail of a tensor).
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    bits, x = _hard_values(device)
    nan = model.is_nan_bits(bits)
    for n in (x.numel(), 7):
        got = x[:n].to(torch.bfloat16)
        _assert_bits(model.tensor_bits(got), model.rne_bits(bits[:n]), f"torch cast on {device}", nan_mask=nan[:n])
        assert torch.isnan(got.float()).cpu().numpy().tolist() == nan[:n].tolist()


def test_torch_cast_under_every_cpu_capability():
    # torch dispatches its CPU cast by capability (the NaN bits differ: 0xFFFF with AVX2/AVX-512,
    # 0x7FC0 with the default kernels); every other value must be the model's under each.
    script = textwrap.dedent("""
        import sys, numpy as np, torch
        sys.path.insert(0, sys.argv[1])
        import _bit_model as model
        bits = model.hard_fp32_bits(np.random.default_rng(0))
        got = model.tensor_bits(model.as_float_tensor(bits).to(torch.bfloat16))
        keep = ~model.is_nan_bits(bits)
        print(int((got != model.rne_bits(bits))[keep].sum()), torch.backends.cpu.get_cpu_capability())
    """)
    for capability in ("default", "avx2"):  # this process runs the highest one (the test above)
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        wrong, used = done.stdout.strip().split(" ", 1)  # torch 2.6 calls the lowest "NO AVX"
        assert wrong == "0", f"torch's bf16 cast under {used}: {wrong} non-NaN values differ from the model"


def test_cpu_kernel_roundings_are_the_model():
    from _native import require_native

    require_native()
    bits, x = _hard_values("cpu")
    for seed, t in SEEDS:
        got = torch.ops.fromage_fused.round_bf16_stochastic(x, torch.tensor(seed), t)
        _assert_bits(model.tensor_bits(got), model.sr_bits(bits, seed, t), f"C++ stochastic {seed, t}")
    _assert_bits(model.tensor_bits(torch.ops.fromage_fused.round_bf16_nearest(x)), model.rne_bits(bits), "C++ nearest")


@pytest.mark.gpu
def test_cuda_kernel_rounding_is_the_model():
    if "cuda" not in available_backends("cuda"):
        pytest.skip("the cuda backend is not available")
    bits, x = _hard_values("cuda")
    for seed, t in SEEDS:
        got = torch.ops.fromage_fused.round_bf16_stochastic(x, torch.tensor(seed, device="cuda"), t)
        _assert_bits(model.tensor_bits(got), model.sr_bits(bits, seed, t), f"CUDA stochastic {seed, t}")


@pytest.mark.parametrize("device", DEVICES)
def test_triton_kernel_roundings_are_the_model(device):
    if "triton" not in available_backends(device):
        pytest.skip(f"the triton backend is not available on {device}")
    from fromage_fused.backends import triton as triton_backend
    from fromage_fused.kernels.fromage_round import nearest_bf16_kernel, stochastic_round_bf16_kernel

    bits, x = _hard_values(device)
    n, block = x.numel(), 4096
    grid = (-(-n // block),)
    for seed, t in SEEDS[:4]:  # the interpreter is slow; the seed's extremes are covered by torch and C++
        out = torch.empty(n, dtype=torch.bfloat16, device=device)
        triton_backend._launch(stochastic_round_bf16_kernel, grid, x, out, torch.tensor(seed, device=device), t, n,
                               BLOCK=block)
        _assert_bits(model.tensor_bits(out), model.sr_bits(bits, seed, t), f"Triton stochastic {seed, t}")
    out = torch.empty(n, dtype=torch.bfloat16, device=device)
    triton_backend._launch(nearest_bf16_kernel, grid, x, out, n, BLOCK=block)
    _assert_bits(model.tensor_bits(out), model.rne_bits(bits), "Triton nearest")


# -- 2. the apply phase from equal stats --------------------------------------------------------------

OPTIONS = {
    "plain": dict(lr=0.01),
    "bound_maximize": dict(lr=0.1234567, p_bound=0.9, maximize=True),
    "no_prefactor_grad_scale": dict(lr=0.003, prefactor=False, grad_scale=1024.0),
}


def _run_apply(name, device, params, grads, stats, *, lr, p_bound=None, maximize=False, prefactor=True,
               grad_scale=None, max_norms=None, sr_seed=None):
    backend = backends.get(name)
    # What the step plan hands a backend: contiguous copies of strided tensors for a dense_only one.
    fmt = torch.contiguous_format if backend.dense_only else torch.preserve_format
    ps = [p.clone(memory_format=fmt) for p in params]
    mn = None if max_norms is None else torch.stack(max_norms)
    phases.apply(
        backend, ps, [g.clone(memory_format=fmt) for g in grads], stats.clone(), lr=torch.tensor(lr, device=device),
        max_norm=mn, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
        grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device),
        sr_seed=None if sr_seed is None else torch.tensor(sr_seed, device=device))
    return ps, None if mn is None else list(mn.unbind())


def _expected(params, grads, stats, dtype, *, lr, p_bound=None, maximize=False, prefactor=True, grad_scale=None,
              max_norms=None, sr_seed=None):
    mn_in = None if max_norms is None else np.array([m.item() for m in max_norms], dtype=np.float32)
    cp, cg, mn = model.coefficients(stats.cpu().numpy(), lr, max_norm=mn_in, p_bound=p_bound, maximize=maximize,
                                    prefactor=prefactor, grad_scale=grad_scale)
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        new = model.update(p.detach().cpu().float().reshape(-1).numpy(), g.detach().cpu().float().reshape(-1).numpy(),
                           cp[i], cg[i])
        if dtype == torch.float32:
            out.append(new.view(np.uint32))
        elif dtype == torch.float16:
            out.append(new.astype(np.float16).view(np.uint16))  # numpy: IEEE round to nearest even
        elif sr_seed is not None:
            out.append(model.sr_bits(new.view(np.uint32), sr_seed, i))
        else:
            out.append(model.rne_bits(new.view(np.uint32)))
    return out, mn


def _tensors(device, dtype, gen):
    """Sizes around every backend's vector width, block and chunk; scales over the dtype's range;
    zero tensors (the fallback branch); a strided view; stats from these finite values, and then
    NaN, infinities, subnormals and the largest finite values put into one parameter and one
    gradient (their rounding must still be the model's)."""
    sizes = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 255, 256, 257, 511, 513, 1023, 1025, 2047, 2048, 2049,
             (63, 65), 8191, 33_000, 70_001, 0]
    decades = 3 if dtype == torch.float16 else 12
    params, grads = [], []
    for n in sizes:
        shape = n if isinstance(n, tuple) else (n,)
        scale = 10.0 ** float(torch.empty(()).uniform_(-decades, decades, generator=gen))
        ratio = 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=gen))
        params.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype))
        grads.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale * ratio).to(dtype))
    params[5].zero_()   # ||p|| = 0: the fallback step
    grads[6].zero_()    # ||g|| = 0
    params[7].zero_()
    grads[7].zero_()
    grid = torch.randn(40, 66, generator=gen).to(dtype)
    params.append(grid.t())   # a strided view (a dense_only backend gets a contiguous copy)
    grads.append(torch.randn(66, 40, generator=gen).to(dtype))
    stats = phases.stats(backends.get("foreach"), [p.to(device) for p in params], [g.to(device) for g in grads])
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 3.3e38, -3.3e38, 1e-39, -1e-40,
                             0.0, -0.0], dtype=torch.float32).to(dtype)
    params[-4][: specials.numel()] = specials
    grads[-4][specials.numel(): 2 * specials.numel()] = specials
    return [p.to(device) for p in params], [g.to(device) for g in grads], stats


def _max_norms(stats, opts, device, gen):
    """Half unset; the others within 2% of the norm the step produces, so both sides of the clamp occur."""
    if opts.get("p_bound") is None:
        return None
    s_pp, s_gg, s_pg = stats.double().cpu().unbind(1)
    lr = opts["lr"]
    a = torch.where((s_pp > 0) & (s_gg > 0), lr * s_pp.sqrt() / s_gg.sqrt(), torch.full_like(s_pp, lr))
    a = -a if opts.get("maximize") else a
    norm = (s_pp - 2 * a * s_pg + a * a * s_gg).clamp(min=0).sqrt() / (1 + lr * lr) ** 0.5
    factor = torch.empty(norm.shape, dtype=torch.float64).uniform_(0.98, 1.02, generator=gen)
    mn = torch.where(torch.arange(norm.numel()) % 2 == 0, torch.full_like(norm, UNSET_MAX_NORM), norm * factor)
    return [m.to(device, torch.float32) for m in mn.float()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, sr", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                                       (torch.float16, False)], ids=["fp32", "bf16", "bf16_sr", "fp16"])
@pytest.mark.parametrize("case", list(OPTIONS))
def test_apply_phase_is_the_model_in_every_backend(device, dtype, sr, case):
    names = _backends_on(device)
    gen = torch.Generator().manual_seed(sum(map(ord, f"{case}{dtype}{sr}")))
    params, grads, stats = _tensors(device, dtype, gen)
    opts = OPTIONS[case]
    mn = _max_norms(stats, opts, device, gen)
    seed = 987_654_321_123 if sr else None
    want, want_mn = _expected(params, grads, stats, dtype, max_norms=mn, sr_seed=seed, **opts)
    for name in names:
        got, got_mn = _run_apply(name, device, params, grads, stats, max_norms=mn, sr_seed=seed, **opts)
        for i, (g, w) in enumerate(zip(got, want)):
            gb = model.tensor_bits(g)
            # NaN bits are promised for bf16 only, and not for torch's own cast (foreach, to nearest).
            nan_bits_promised = dtype == torch.bfloat16 and (sr or name != "foreach")
            nan = None if nan_bits_promised else np.isnan(g.detach().cpu().float().reshape(-1).numpy())
            if nan is not None:
                if dtype == torch.bfloat16:
                    want_nan = (w & 0x7FFF) > 0x7F80
                else:
                    want_nan = np.isnan(w.view(np.float32 if dtype == torch.float32 else np.float16))
                assert (nan == want_nan).all(), f"{name} tensor {i}: NaNs in other places than the model's"
            _assert_bits(gb, w, f"{name} {case} tensor {i} ({g.numel()} elements)", nan_mask=nan)
        if want_mn is not None:
            _assert_bits(np.concatenate([model.tensor_bits(m) for m in got_mn]), want_mn.view(np.uint32),
                         f"{name} max_norm")


def _random_stats(gen, n, device):
    """Stats rows of every kind: log-uniform norms over 60 decades, squares of midpoints (where a
    square root that is not correctly rounded fails), zeros, subnormals, any cosine."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=gen)))
    s_pp = np.exp(rng.uniform(np.log(1e-30), np.log(1e30), n)).astype(np.float32)
    s_gg = np.exp(rng.uniform(np.log(1e-30), np.log(1e30), n)).astype(np.float32)
    hard = rng.random(n) < 0.4
    s_pp[hard] = model.hard_sqrt_args(rng, int(hard.sum()))
    hard = rng.random(n) < 0.4
    s_gg[hard] = model.hard_sqrt_args(rng, int(hard.sum()))
    s_pp[rng.random(n) < 0.05] = 0.0
    s_gg[rng.random(n) < 0.05] = 0.0
    s_pp[rng.random(n) < 0.02] = 1e-42
    cos = rng.uniform(-1, 1, n)
    s_pg = (cos * np.sqrt(s_pp.astype(np.float64) * s_gg.astype(np.float64))).astype(np.float32)
    return torch.from_numpy(np.stack([s_pp, s_gg, s_pg], axis=1)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["plain", "bound_maximize", "no_prefactor_grad_scale"])
def test_coefficients_are_the_model_in_every_backend(device, case):
    # Tensor i is [1, 0] with gradient [0, 1], so the step writes exactly (cp_i, cg_i) into it; the
    # stats are given, not measured: thousands of rows, many where a sloppy sqrt is 1 ulp off.
    names = _backends_on(device)
    gen = torch.Generator().manual_seed(len(case))
    opts = dict(OPTIONS[case])
    for lr in (opts.pop("lr"), float(torch.empty(()).uniform_(1e-4, 1.0, generator=gen))):
        n = 3000
        stats = _random_stats(gen, n, device)
        mn = None
        if opts.get("p_bound") is not None:
            # unset, or (as fp32 of the norms) near the clamp threshold of every row
            mn_v = torch.where(torch.rand(n, generator=gen) < 0.3, torch.full((n,), UNSET_MAX_NORM),
                               stats[:, 0].cpu().double().sqrt().float()
                               * torch.empty(n).uniform_(0.5, 1.5, generator=gen))
            mn = [m.to(device) for m in mn_v]
        cp, cg, want_mn = model.coefficients(stats.cpu().numpy(), lr, max_norm=None if mn is None else mn_v.numpy(),
                                             **opts)
        one, zero = np.float32(1), np.float32(0)
        want = np.stack([model.update(one, zero, cp, cg), model.update(zero, one, cp, cg)], axis=1)
        params = [torch.tensor([1.0, 0.0], device=device) for _ in range(n)]
        grads = [torch.tensor([0.0, 1.0], device=device) for _ in range(n)]
        for name in names:
            rows = n if name != "triton" or device != "cpu" else 400  # the interpreter runs a program per tensor
            got, got_mn = _run_apply(name, device, params[:rows], grads[:rows], stats[:rows], lr=lr,
                                     max_norms=None if mn is None else mn[:rows], **opts)
            got = np.stack([g.cpu().numpy() for g in got])
            nan = np.isnan(got)
            assert (nan == np.isnan(want[:rows])).all(), f"{name}: NaN coefficients in other rows than the model's"
            _assert_bits(got.view(np.uint32), want[:rows].view(np.uint32), f"{name} {case} lr={lr} coefficients",
                         nan_mask=nan)
            if want_mn is not None:
                _assert_bits(np.array([model.tensor_bits(m)[0] for m in got_mn]), want_mn[:rows].view(np.uint32),
                             f"{name} max_norm")


# -- 3. the compiled GPU kernels: nothing fused, nothing approximate -----------------------------------


def test_triton_apply_kernel_compiles_to_unfused_correctly_rounded_arithmetic(tmp_path):
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("no Triton with an NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "_triton_fp_probe.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for variant, c in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert c["fma"] == 0 and c["unrounded"] == 0, f"{variant}: fused or contractible fp32 arithmetic: {c}"
        assert c["approx_or_full"] == 0 and c["ftz"] == 0, f"{variant}: approximate or flushing arithmetic: {c}"
        assert c["mul_rn"] > 0 and c["add_rn"] > 0 and c["div_rn"] > 0 and c["sqrt_rn"] > 0, c


def test_triton_backend_launches_the_apply_kernel_with_its_options(monkeypatch):
    if "triton" not in available_backends("cpu"):
        pytest.skip("the triton backend is not available on cpu")
    from fromage_fused.backends import triton as triton_backend
    from fromage_fused.kernels import engine_pass, rule_fromage

    seen = []
    real = triton_backend._launch
    monkeypatch.setattr(triton_backend, "_launch", lambda kernel, grid, *a, **meta: (seen.append((kernel, meta)),
                                                                                     real(kernel, grid, *a, **meta)))
    p, g = [torch.randn(10)], [torch.randn(10)]
    functional.fromage(p, g, None, lr=0.1, backend="triton")
    applies = [meta for kernel, meta in seen
               if kernel is engine_pass.pass_kernel and meta["BODY"] is rule_fromage.body_1]
    assert applies and all(meta.get("enable_fp_fusion") is False for meta in applies)
    assert rule_fromage.PASSES[1][2] is False  # the update pass is declared unfused


def _ptx_entries(ptx):
    starts = [m.start() for m in re.finditer(r"\.entry\s", ptx)] + [len(ptx)]
    for a, b in zip(starts, starts[1:]):
        body = ptx[a:b]
        yield re.match(r"\.entry\s+(\S+?)\(", body).group(1), body


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_apply_kernels_compile_to_unfused_correctly_rounded_arithmetic(arch, tmp_path):
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path / "k.ptx"
    from fromage_fused._build import CSRC

    done = subprocess.run([nvcc, "-std=c++17", "-O3", f"-I{CSRC}", "-ptx", f"-arch={arch}",
                           str(CSRC / "engine_cuda.cu"), "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Fromage's update pass: pass_kernel<FromageRule, 1, ...> (mangled)
    applies = [(name, body) for name, body in _ptx_entries(out.read_text())
               if "pass_kernelINS_11FromageRuleELi1E" in name]
    assert len(applies) >= 4, [name for name, _ in applies]
    for name, body in applies:
        assert not re.search(r"\bfma\.\S*f32", body), f"{name}: fused multiply-add in the apply kernel"
        assert not re.search(r"\b(?:mul|add|sub|div|sqrt)\.f32", body), f"{name}: fp32 arithmetic ptxas may contract"
        assert not re.search(r"\.(?:approx|full|ftz)\.\S*f32", body), f"{name}: approximate or flushing fp32 arithmetic"
        assert re.search(r"\bsqrt\.rn\.f32", body) and re.search(r"\bdiv\.rn\.f32", body), name


# -- 4. every backend repeats itself -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16_sr"])
def test_every_backend_repeats_itself(device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    names = [n for _, n in backend_cases((device,))]
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(n, generator=gen).to(dtype).to(device) for n in (40_000, 33, 4099, 1)]
    grads = [torch.randn(p.shape, generator=gen).to(dtype).to(device) for p in params]
    seed = torch.tensor(5, device=device) if dtype == torch.bfloat16 else None
    for name in names:
        runs = []
        for _ in range(2):
            ps = [p.clone() for p in params]
            mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in ps]
            for _ in range(2):
                functional.fromage(ps, grads, mn, lr=0.01, p_bound=1.0, backend=name, sr_seed=seed)
            runs.append([model.tensor_bits(t) for t in ps + mn])
        for a, b in zip(*runs):
            _assert_bits(a, b, f"{name}: a second run")
