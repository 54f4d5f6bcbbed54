"""The ``cuda`` backend (multi-tensor CUDA kernels of csrc/) on a GPU: oracle, triton, launches."""
import pytest
import torch

from fromage_fused.rules.fromage import phases

from fromage_fused import backends, functional
from fromage_fused.functional import UNSET_MAX_NORM
from fromage_fused.engine.rounding import stochastic_round_bf16
from _host_reads import forbid_cuda_sync
from _native import fromage_apply_op, fromage_stats_op, require_native
from _oracle import compare_with_oracle
from tolerances import ORACLE_TOL

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tensors across several 65536-element blocks, odd lengths, tiny and empty ones.
SHAPES = [(200_001,), (3,), (512, 257), (0,), (1,), (17, 5), (65536,), (65537,)]


@pytest.fixture(autouse=True)
def _ext():
    require_native()
    reason = backends.get("cuda").unavailable_reason(torch.device("cuda"))
    if reason is not None:
        pytest.fail(f"the cuda backend is unavailable on a machine with a GPU: {reason}")


def _reference(params, grads, **kw):
    ref = [p.detach().to("cpu", torch.float64, copy=True) for p in params]
    functional.fromage(ref, [g.to("cpu", torch.float64) for g in grads], kw.pop("max_norms", None), backend="reference",
                       **kw)
    return ref


def _close(got, want, dtype):
    atol, rtol = ORACLE_TOL[dtype]["step"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.detach().to("cpu", torch.float64), b, atol=atol
                                   + rtol * b.abs().max().item() if b.numel() else atol, rtol=0)


def test_auto_picks_a_gpu_kernel_backend():
    assert backends.resolve("auto", "cuda").name in ("cuda", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p_bound", [None, 1.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_oracle(dtype, p_bound, maximize):
    compare_with_oracle("cuda", dtype, device="cuda", p_bound=p_bound, maximize=maximize, tol=ORACLE_TOL[dtype])
    compare_with_oracle("cuda", dtype, device="cuda", p_bound=p_bound, maximize=maximize, shapes=SHAPES, steps=4,
                        tol=ORACLE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_triton(dtype):
    if "triton" not in backends.available_backends("cuda"):
        pytest.skip("triton backend unavailable")
    params = [torch.randn(s, device="cuda").to(dtype) for s in SHAPES]
    grads = [torch.randn_like(p) for p in params]
    out = {}
    for name in ("cuda", "triton"):
        ps = [p.clone() for p in params]
        mn = [torch.full((), UNSET_MAX_NORM, device="cuda") for _ in ps]
        functional.fromage(ps, grads, mn, lr=0.03, p_bound=1.1, backend=name)
        out[name] = (ps, mn)
    for a, b in zip(out["cuda"][0], out["triton"][0]):
        atol = (1e-6 if dtype == torch.float32
                else 2 * ORACLE_TOL[dtype]["step"][1] * (b.abs().max().item() if b.numel() else 0))
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=1e-5)
    torch.testing.assert_close(torch.stack(out["cuda"][1]), torch.stack(out["triton"][1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_views_take_the_scalar_path(dtype):
    base = torch.randn(3 * 70_000, device="cuda").to(dtype)
    gbase = torch.randn(3 * 70_000, device="cuda").to(dtype)
    params = [base[1:70_001], base[70_003:140_003], base[140_010:140_017]]
    grads = [gbase[0:70_000], gbase[70_001:140_001], gbase[140_003:140_010]]  # aligned p with unaligned g too
    assert params[0].data_ptr() % 16 and grads[1].data_ptr() % 16
    mn = [torch.full((), UNSET_MAX_NORM, device="cuda") for _ in params]
    mn_ref = [torch.full((), UNSET_MAX_NORM) for _ in params]
    want = _reference(params, grads, lr=0.05, p_bound=0.9, max_norms=mn_ref)
    functional.fromage(params, grads, mn, lr=0.05, p_bound=0.9, backend="cuda")
    _close(params, want, dtype)
    torch.testing.assert_close(torch.stack(mn).cpu(), torch.stack(mn_ref))


def test_non_contiguous_tensors_are_handled():
    grid = torch.randn(300, 402, device="cuda")
    p, g = grid[:, ::2], torch.randn(402, 300, device="cuda").t()[:, ::2]
    want = _reference([p], [g], lr=0.05)
    functional.fromage([p], [g], None, lr=0.05, backend="cuda")
    _close([grid[:, ::2]], want, torch.float32)


def test_many_tensors_and_a_multi_block_tensor_in_one_group():
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 5000, (350,), generator=gen).tolist() + [300_000]
    params = [torch.randn(n, device="cuda") for n in sizes]
    grads = [torch.randn_like(p) for p in params]
    mn = [torch.full((), UNSET_MAX_NORM, device="cuda") for _ in params]
    mn_ref = [torch.full((), UNSET_MAX_NORM) for _ in params]
    want = _reference(params, grads, lr=0.02, p_bound=1.0, max_norms=mn_ref)
    functional.fromage(params, grads, mn, lr=0.02, p_bound=1.0, backend="cuda")
    _close(params, want, torch.float32)
    torch.testing.assert_close(torch.stack(mn).cpu(), torch.stack(mn_ref))


@pytest.mark.parametrize("n", [1, 37, 321, 2048])
def test_one_launch_per_phase_for_any_tensor_count(n):
    # Sizes from 0 to ~70k: empty, one-block and two-block tensors (the stats counters' memset).
    sizes = [(i * 977) % 70_000 for i in range(n)]
    params = [torch.randn(s, device="cuda") for s in sizes]
    grads = [torch.randn_like(p) for p in params]
    mn = [torch.full((), UNSET_MAX_NORM, device="cuda") for _ in params]
    lr = torch.full((), 0.01, device="cuda")

    def step():
        stats = fromage_stats_op(params, grads, True)
        fromage_apply_op(params, grads, stats, lr, mn, 1.0, False, True, None, None, None)

    step()  # the tables are uploaded once
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    on_gpu = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [k for k in on_gpu if "memcpy" in k.lower()]
    memsets = [k for k in on_gpu if "memset" in k.lower()]
    kernels = [k for k in on_gpu if k not in copies and k not in memsets]
    assert not copies, f"cached tables were uploaded again: {copies}"
    assert len(kernels) == 2, kernels
    assert len(memsets) == (1 if max(sizes) > 65536 else 0), memsets


def test_deterministic():
    params = [torch.randn(n, device="cuda") for n in (3_000_000, 77, 131_072)]
    grads = [torch.randn_like(p) for p in params]
    runs = [fromage_stats_op(params, grads, True) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


def test_found_inf_and_grad_scale_on_the_device():
    params = [torch.zeros(1000, device="cuda"), torch.randn(1000, device="cuda")]
    grads = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    mn = [torch.full((), UNSET_MAX_NORM, device="cuda") for _ in params]
    functional.fromage(params, grads, mn, lr=0.1, p_bound=1.0, backend="cuda", found_inf=torch.ones((), device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(m.item() == UNSET_MAX_NORM for m in mn)
    want = _reference(params, grads, lr=0.1)
    functional.fromage(params, [g * 512 for g in grads], None, lr=0.1, backend="cuda",
                       found_inf=torch.zeros((), device="cuda"), grad_scale=torch.full((), 512.0, device="cuda"))
    _close(params, want, torch.float32)


def test_stochastic_rounding_is_the_shared_recipe_bit_for_bit():
    x = torch.randn(100_003) * torch.logspace(-30, 30, 100_003)
    seed = torch.tensor(2**33 + 5, dtype=torch.int64)
    got = torch.ops.fromage_fused.round_bf16_stochastic(x.cuda(), seed.cuda(), 11).cpu()
    want = stochastic_round_bf16(x, seed, 11)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_no_host_synchronisation_and_graph_capture():
    params = [torch.randn(n, device="cuda") for n in (100_000, 9, 0)]
    grads = [torch.randn_like(p) for p in params]
    mn = [torch.full((), UNSET_MAX_NORM, device="cuda") for _ in params]
    lr = torch.full((), 0.01, device="cuda")
    groups = functional.plan(params, grads, mn, backend="cuda", p_bound=1.0)
    functional.step_groups(groups, lr=lr, p_bound=1.0)  # warm-up (allocator, lazy init)
    with forbid_cuda_sync():
        functional.step_groups(groups, lr=lr, p_bound=1.0)
    eager = [p.clone() for p in params]
    functional.step_groups(functional.plan(eager, grads, [m.clone() for m in mn], backend="cuda", p_bound=1.0), lr=lr,
                           p_bound=1.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            functional.step_groups(groups, lr=lr, p_bound=1.0)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(params, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_tensor_over_2_31_elements():
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * n + (2 << 30):  # two bf16 tensors and float64 slices of them
        pytest.skip("not enough GPU memory for two bf16 tensors of 2^31 elements")
    p = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    g = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    stats = fromage_stats_op([p], [g], True)[0].double().cpu()
    want = torch.zeros(3, dtype=torch.float64)
    for s in range(0, n, 1 << 28):
        ps, gs = p[s:s + (1 << 28)].double(), g[s:s + (1 << 28)].double()
        want += torch.stack([(ps * ps).sum(), (gs * gs).sum(), (ps * gs).sum()]).cpu()
    torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-2 * n ** 0.5)
    tail_p, tail_g = p[-5000:].double(), g[-5000:].double()
    lr = 0.01
    a = lr * (want[0] / want[1]).sqrt()
    expect_tail = (tail_p - a * tail_g) / (1 + lr * lr) ** 0.5
    phases.apply(backends.get("cuda"), [p], [g], stats.float().cuda().reshape(1, 3),
                 lr=torch.full((), lr, device="cuda"),
                               max_norm=None, p_bound=None, maximize=False)
    torch.testing.assert_close(p[-5000:].double(), expect_tail, atol=2e-2, rtol=2 ** -7)
