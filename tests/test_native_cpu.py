"""The ``cpu`` backend (C++ kernels of csrc/) against the float64 oracle and the shared recipes."""
import pytest
import torch

from fromage_fused.rules.fromage import phases

from fromage_fused import _build, backends, functional
from fromage_fused.functional import UNSET_MAX_NORM
from fromage_fused.engine.rounding import stochastic_round_bf16
from fromage_fused.rules.fromage.coefficients import coefficients
from _native import fromage_apply_op, fromage_stats_op, require_native
from _oracle import compare_with_oracle
from tolerances import ORACLE_TOL
from _host_reads import forbid_host_reads

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# test_oracle_parity runs every available backend on MIXED_SHAPES; these add tensors that span
# several kernel chunks (32768 elements), of odd length, beside tiny and empty ones.
SHAPES = [(70001,), (3,), (256, 257), (0,), (1,), (17, 5)]


@pytest.fixture(autouse=True)
def _ext():
    require_native()


def test_auto_picks_cpu_on_cpu():
    assert backends.resolve("auto", "cpu").name == "cpu"
    assert backends.available_backends("cpu")[0] == "cpu"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p_bound, maximize", [(None, False), (1.0, True)])
def test_matches_oracle_across_chunks(dtype, p_bound, maximize):
    compare_with_oracle("cpu", dtype, p_bound=p_bound, maximize=maximize, shapes=SHAPES, steps=4, tol=ORACLE_TOL[dtype])


def test_float64_groups_go_to_foreach():
    groups = functional.plan([torch.randn(3, dtype=torch.float64)], [torch.randn(3, dtype=torch.float64)], None,
                             backend="cpu")
    assert groups[0].backend.name == "foreach"


def _reference_step(params, grads, **kw):
    ref = [p.detach().double().clone() for p in params]
    functional.fromage(ref, [g.double() for g in grads], kw.pop("max_norms", None), backend="reference", **kw)
    return ref


def test_stats_sum_accurately_over_many_chunks():
    p = torch.randn(1_000_003) + 3.0  # a large mean makes a running fp32 sum drift
    g = torch.randn(1_000_003)
    got = fromage_stats_op([p], [g], True)[0].double()
    want = torch.stack([(p.double() ** 2).sum(), (g.double() ** 2).sum(), (p.double() * g.double()).sum()])
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-3)


@pytest.mark.skipif(not _build.openmp_flags(), reason="the extension is built without OpenMP here (not Linux with "
                    "GCC and a torch built with OpenMP): its kernels run on one thread")
def test_kernels_run_on_torch_threads():
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.ops.fromage_fused.parallel_width() == t
    finally:
        torch.set_num_threads(threads)


def test_results_do_not_depend_on_thread_count():
    params = [torch.randn(n) for n in (100_000, 33, 65_537)]
    grads = [torch.randn_like(p) for p in params]
    out = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            ps = [p.clone() for p in params]
            stats = fromage_stats_op(ps, grads, True)
            functional.fromage(ps, grads, None, lr=0.01, backend="cpu")
            out.append((stats, ps))
    finally:
        torch.set_num_threads(threads)
    for stats, ps in out[1:]:
        assert torch.equal(out[0][0], stats)
        assert all(torch.equal(a, b) for a, b in zip(out[0][1], ps))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_and_non_contiguous_tensors(dtype):
    base_p = torch.randn(2 * 4099 + 3, dtype=torch.float64)
    base_g = torch.randn(2 * 4099 + 3, dtype=torch.float64)
    grid = torch.randn(40, 66, dtype=torch.float64).to(dtype)
    params = [
        base_p.to(dtype)[1:4100],          # contiguous, data pointer off by one element
        base_p.to(dtype)[3:].view(2, -1),  # contiguous 2-d, odd offset
        grid[:, ::2],                      # strided view of a larger tensor
        torch.randn(66, 40, dtype=dtype).t()[5:9],  # transposed view
    ]
    grads = [base_g.to(dtype)[2:4101], base_g.to(dtype)[3:].view(2, -1), torch.randn(66, 40, dtype=dtype).t()[:, ::2],
             torch.randn(4, 66, dtype=dtype)]
    assert not params[2].is_contiguous() and not grads[2].is_contiguous() and params[0].data_ptr() % 16
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params]
    mn_ref = [m.clone() for m in mn]
    want = _reference_step(params, grads, lr=0.05, p_bound=0.9, max_norms=mn_ref)
    functional.fromage(params, grads, mn, lr=0.05, p_bound=0.9, backend="cpu")
    atol, rtol = ORACLE_TOL[dtype]["step"]
    for got, ref in zip(params, want):
        torch.testing.assert_close(got.double(), ref, atol=atol + rtol * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(grid[:, ::2].double(), want[2], atol=atol + rtol * want[2].abs().max().item(), rtol=0)
    torch.testing.assert_close(torch.stack(mn), torch.stack(mn_ref))


def test_empty_tensors_and_empty_lists():
    e = torch.empty(0)
    mn = [torch.full((), UNSET_MAX_NORM)]
    functional.fromage([e], [torch.empty(0)], mn, lr=0.1, p_bound=2.0, backend="cpu")
    assert mn[0].item() == 0.0  # p_bound * ||p|| of an empty tensor
    # an empty list makes no group: backends are never called with empty lists (backends/_base.py)
    assert functional.plan([], [], None, backend="cpu") == []
    functional.fromage([], [], None, lr=0.1, backend="cpu")
    phases.apply(backends.get("cpu"), [], [], torch.zeros(0, 3), lr=torch.tensor(0.1), max_norm=None, p_bound=None,
                 maximize=False)


def test_found_inf_changes_nothing():
    params = [torch.randn(50), torch.randn(7, 3)]
    grads = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params]
    functional.fromage(params, grads, mn, lr=0.1, p_bound=1.0, backend="cpu", found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(m.item() == UNSET_MAX_NORM for m in mn)
    functional.fromage(params, grads, mn, lr=0.1, p_bound=1.0, backend="cpu", found_inf=torch.tensor(0.0))
    assert not torch.equal(params[0], before[0]) and all(m.item() > 0 for m in mn)


def test_grad_scale_unscales_only_the_fallback():
    # parameter 0 is zero (fallback branch), 1 is not (scale-invariant branch)
    params = [torch.zeros(300), torch.randn(300)]
    grads = [torch.randn(300), torch.randn(300)]
    scale = 1024.0
    want = _reference_step(params, grads, lr=0.1)
    functional.fromage(params, [g * scale for g in grads], None, lr=0.1, backend="cpu", grad_scale=torch.tensor(scale))
    for got, ref in zip(params, want):
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)


def test_bad_input_is_rejected_before_anything_changes():
    params = [torch.randn(10), torch.randn(10, 4)[:, 0], torch.randn(3)]
    grads = [torch.randn(10), torch.randn(10), torch.randn(3)]
    before = [p.clone() for p in params]
    stats = torch.zeros(3, 3)
    lr = torch.tensor(0.1)
    op = fromage_apply_op
    with pytest.raises(RuntimeError, match="not contiguous"):
        op(params, grads, stats, lr, None, None, False, True, None, None, None)
    ok = [params[0], params[2]]
    with pytest.raises(RuntimeError, match="stats must be"):
        op(ok, [grads[0], grads[2]], torch.zeros(3, 3), lr, None, None, False, True, None, None, None)
    with pytest.raises(RuntimeError, match="lr must be"):
        op(ok, [grads[0], grads[2]], torch.zeros(2, 3), lr.double(), None, None, False, True, None, None, None)
    for wrong in (None, torch.zeros(()), torch.zeros(3), torch.zeros(2, dtype=torch.float64), torch.zeros(4)[::2]):
        with pytest.raises(RuntimeError, match="max_norm"):
            op(ok, [grads[0], grads[2]], torch.zeros(2, 3), lr, wrong, 1.0, False, True, None, None, None)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op([torch.randn(2, dtype=torch.float64)], [torch.randn(2, dtype=torch.float64)], torch.zeros(1, 3), lr, None,
           None, False, True, None, None, None)
    assert all(torch.equal(a, b) for a, b in zip(params, before))


def test_stochastic_rounding_op_is_the_shared_recipe_bit_for_bit():
    x = torch.randn(5000) * torch.logspace(-40, 38, 5000)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"), 3.4028235e38,
                             -3.4028235e38, 1e-45, -1e-45, 1.0, 1.00390625])
    x = torch.cat([x, specials])
    for seed, index in ((0, 0), (12345, 7), (-3, 1000), (2**40 + 17, 3)):
        s = torch.tensor(seed, dtype=torch.int64)
        got = torch.ops.fromage_fused.round_bf16_stochastic(x, s, index)
        want = stochastic_round_bf16(x, s, index)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (seed, index)  # NaN: 0x7FC0 in both


@pytest.mark.parametrize("p_bound", [None, 0.8])
def test_bf16_step_with_sr_seed_is_the_shared_recipe_bit_for_bit(p_bound):
    # The C++ step equals the torch recipe applied to the torch coefficients and update from the same
    # stats, on every element of 300 random tensors (one backend's stats, so nothing else differs).
    gen = torch.Generator().manual_seed(3)
    sizes = torch.randint(0, 5000, (300,), generator=gen).tolist() + [70_000]
    params = [(torch.randn(n, generator=gen) * 10.0 ** float(torch.randint(-8, 8, (), generator=gen)))
              .to(torch.bfloat16)
              for n in sizes]
    grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in params]
    seed, lr = torch.tensor(987654321, dtype=torch.int64), torch.tensor(0.05)
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params] if p_bound else None
    cpu = backends.get("cpu")
    stats = phases.stats(cpu, params, grads, inner=p_bound is not None)
    coef_p, coef_g, _ = coefficients(stats, lr, max_norm=None if mn is None else torch.stack(mn), p_bound=p_bound)
    want = [stochastic_round_bf16(coef_p[i] * p.float() + coef_g[i] * g.float(), seed,
                                  i) for i, (p, g) in enumerate(zip(params, grads))]
    phases.apply(cpu, params, grads, stats, lr=lr, max_norm=None if mn is None else torch.stack(mn), p_bound=p_bound,
              maximize=False, sr_seed=seed)
    differ = sum(int((got.view(torch.int16) != w.view(torch.int16)).sum()) for got, w in zip(params, want))
    assert differ == 0, f"{differ} of {sum(sizes)} bf16 elements differ"


def test_no_host_synchronisation():
    params = [torch.randn(40), torch.zeros(8), torch.randn(3, 3).to(torch.bfloat16)]
    grads = [torch.randn_like(p) for p in params]
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params]
    lr, found_inf, scale = torch.tensor(0.01), torch.tensor(0.0), torch.tensor(8.0)
    seed = torch.tensor(5, dtype=torch.int64)
    with forbid_host_reads():
        functional.fromage(params, grads, mn, lr=lr, p_bound=1.0, backend="cpu", found_inf=found_inf, grad_scale=scale,
                           sr_seed=seed)
    assert all(m.item() >= 0 for m in mn)
