"""deep_relative_trust, relative_changes and max_safe_lr against direct float64 computations."""
import contextlib
import decimal
import math

import pytest
import torch

import fromage_fused
from fromage_fused import deep_relative_trust, max_safe_lr, relative_changes
from _oracle import MIXED_SHAPES, ZERO_INIT, mixed_tensors
from _host_reads import forbid_host_reads

# float32/bf16/fp16 tensors are measured in float64 and the ratio rounded once to float32
# (2^-24 relative); float64 tensors' ratios carry the rounding of sums of a few thousand squares.
TRUST_RTOL = {torch.float64: 1e-13, torch.float32: 1.2e-7, torch.bfloat16: 1.2e-7, torch.float16: 1.2e-7}


def _direct(a, b):
    """The definition in float64, one tensor at a time, zero norms by the documented convention."""
    out = []
    for x, y in zip(a, b):
        x, y = x.double(), y.to(x.dtype).double()
        d, n = (y - x).norm().item(), x.norm().item()
        out.append(d / n if n > 0 else (math.inf if d > 0 else 0.0))
    return out


def _exact(a, b):
    """The definition in exact decimal arithmetic on the tensors' values, rounded once to float64.

    Needed where float64 itself overflows or underflows (float64 tensors near its range's ends).
    """
    ctx = decimal.Context(prec=60, Emax=10 ** 6, Emin=-10 ** 6)
    out = []
    for x, y in zip(a, b):
        y = y.to(x.dtype)
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        x, y = x.double().flatten().tolist(), y.double().flatten().tolist()
        xs = [decimal.Decimal(v) for v in x]  # exact
        d = [ctx.subtract(decimal.Decimal(w), v) for v, w in zip(xs, y)]
        n2 = sum((ctx.multiply(v, v) for v in xs), decimal.Decimal(0))
        d2 = sum((ctx.multiply(v, v) for v in d), decimal.Decimal(0))
        if n2 == 0:
            out.append(0.0 if d2 == 0 else math.inf)
        else:
            out.append(float(ctx.sqrt(ctx.divide(d2, n2))))
    return out


@contextlib.contextmanager
def _flush_denormals():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _pair(dtype, seed=0):
    a = mixed_tensors(dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    b = []
    for i, x in enumerate(a):
        scale = 10.0 ** (i % 4 - 3)  # relative changes from 1e-3 to 1
        b.append((x.double() + scale * (x.double().norm()
                                        + 1) * torch.randn(x.shape, generator=gen,
                                                           dtype=torch.float64) / max(x.numel(), 1) ** 0.5).to(dtype))
    b[ZERO_INIT] = a[ZERO_INIT].clone()  # a zero tensor left unchanged
    return a, b


@pytest.mark.parametrize("dtype", list(TRUST_RTOL))
def test_relative_changes_match_float64(dtype):
    a, b = _pair(dtype)
    got = relative_changes(a, b)
    want = torch.tensor(_direct(a, b), dtype=torch.float64)
    assert got.shape == (len(a),)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=TRUST_RTOL[dtype], atol=0)
    assert want[ZERO_INIT] == 0 and want[MIXED_SHAPES.index((0,))] == 0  # the zero-norm cases are in


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deep_relative_trust_matches_product(dtype):
    a, b = _pair(dtype, seed=3)
    want = math.prod(1 + r for r in _direct(a, b)) - 1
    got = deep_relative_trust(a, b)
    assert got.dim() == 0
    assert got.item() == pytest.approx(want, rel=TRUST_RTOL[dtype])


def test_small_distances_keep_precision():
    a = [torch.randn(20, 20) for _ in range(50)]
    b = [x * (1 + 1e-6) for x in a]
    rel = relative_changes(a, b).double()
    want = math.expm1(sum(math.log1p(r) for r in _direct(a, b)))
    assert deep_relative_trust(a, b).item() == pytest.approx(want, rel=1e-3)
    assert rel.sum().item() == pytest.approx(want, rel=1e-3)


def _full(n, v, dtype=torch.float32):
    return torch.full((n,), v, dtype=dtype)


# (a, b) pairs at the ends of each dtype's range: squared norms that overflow or underflow, a
# difference that overflows, subnormals, ratios near the result's own limits.
EXTREMES = {
    "fp32 norm 3e19, +1%": ([_full(10, 1e19)], [_full(10, 1e19) * 1.01]),
    "fp32 norm 3e19, x2": ([_full(10, 1e19)], [_full(10, 2e19)]),
    "fp32 max, negated": ([_full(5, 3e38)], [_full(5, -3e38)]),
    "fp32 largest element among small ones": ([torch.cat([_full(1, 3.4e38), _full(99, 1.0)])],
                                              [torch.cat([_full(1, 3.4e38), _full(99, 2.0)])]),
    "fp32 norm 3e-23, x1.5": ([_full(10, 1e-23)], [_full(10, 1.5e-23)]),
    "fp32 subnormals": ([torch.tensor([1e-45, 0.0, 3e-45])], [torch.tensor([2e-45, 1e-45, 3e-45])]),
    "fp32 tiny change of a huge tensor": ([_full(10, 1e30)], [torch.cat([_full(1, 1e30 + 1e25), _full(9, 1e30)])]),
    "fp32 ratio 1e37": ([_full(4, 1e-20)], [_full(4, 1e17)]),
    "fp32 ratio beyond range": ([_full(4, 1e-30)], [_full(4, 1e30)]),
    "fp32 ratio 1e-30": ([_full(4, 1e15)], [torch.cat([_full(1, 1e15),
                                                       _full(3, 1e15)]) + torch.tensor([0.0, 0.0, 0.0, 1e-15])]),
    "zero changed by 3e-23": ([torch.zeros(10)], [_full(10, 1e-23)]),
    "zero changed by a subnormal": ([torch.zeros(10)], [torch.tensor([0.0] * 9 + [1e-45])]),
    "fp64 norm 3e200, +1%": ([_full(10, 1e200, torch.float64)], [_full(10, 1.01e200, torch.float64)]),
    "fp64 max, negated": ([_full(3, 1.7e308, torch.float64)], [_full(3, -1.7e308, torch.float64)]),
    "fp64 norm 3e-200, x1.5": ([_full(10, 1e-200, torch.float64)], [_full(10, 1.5e-200, torch.float64)]),
    "fp64 subnormals": ([torch.tensor([5e-324, 1e-323], dtype=torch.float64)],
                        [torch.tensor([1e-323, 1e-323], dtype=torch.float64)]),
    "bf16 norm 3e30, x1.5": ([_full(10, 1e30, torch.bfloat16)], [_full(10, 1.5e30, torch.bfloat16)]),
    "bf16 norm 3e-25, x1.5": ([_full(10, 1e-25, torch.bfloat16)], [_full(10, 1.5e-25, torch.bfloat16)]),
    "fp16 max, negated": ([_full(10, 6e4, torch.float16)], [_full(10, -6e4, torch.float16)]),
    "complex64 norm 3e19": ([torch.full((5,), 1e19 + 1e19j, dtype=torch.complex64)],
                            [torch.full((5,), 1.01e19 + 1e19j, dtype=torch.complex64)]),
}


@pytest.mark.parametrize("case", list(EXTREMES))
def test_extremes_match_exact(case):
    a, b = EXTREMES[case]
    want = _exact(a, b)
    got = relative_changes(a, b).double().tolist()
    out_dtype = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    want = [torch.tensor(w, dtype=out_dtype).item() for w in want]  # the truth, rounded to the result's dtype
    for g, w in zip(got, want):
        if math.isinf(w) or w == 0:
            assert g == w
        else:
            assert g == pytest.approx(w, rel=TRUST_RTOL[out_dtype]), (g, w)
    drt = deep_relative_trust(a, b).item()
    assert drt == pytest.approx(math.prod(1 + w for w in want) - 1, rel=TRUST_RTOL[out_dtype])


def test_issue_examples():
    x = torch.full((10,), 1e19)
    assert relative_changes([x], [x * 1.01]).item() == pytest.approx(0.01, rel=1e-5)
    assert relative_changes([x], [x * 2]).item() == pytest.approx(1.0, rel=1e-6)
    with _flush_denormals():  # squares below 1.2e-38 flush to zero: the scaled path never forms them
        assert relative_changes([torch.zeros(10)], [torch.full((10,), 1e-21)]).item() == math.inf
        assert relative_changes([torch.full((10,), 1e-21)],
                                [torch.full((10,), 3e-21)]).item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_random_magnitudes_match_exact(dtype, seed):
    # Tensors whose elements span the whole exponent range of the dtype, changed by relative
    # amounts from 1e-6 to 1e3.
    gen = torch.Generator().manual_seed(seed)
    top = 127 if dtype == torch.float32 else 1023
    a, b = [], []
    for _ in range(6):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        scale = 2.0 ** float(torch.randint(-top + 30, top - 10, (1,), generator=gen))
        x = (torch.randn(n, generator=gen, dtype=torch.float64) * scale
             * 2.0 ** torch.randint(-8, 8, (n,), generator=gen)).to(dtype)
        rel = 10.0 ** float(torch.empty(1).uniform_(-6, 3, generator=gen))
        y = (x.double() + rel * scale * torch.randn(n, generator=gen, dtype=torch.float64) / n ** 0.5).to(dtype)
        a.append(x)
        b.append(y)
    want = _exact(a, b)
    got = relative_changes(a, b).double().tolist()
    assert got == pytest.approx(want, rel=TRUST_RTOL[dtype])


def test_non_finite_inputs_are_never_finite():
    for a, b in [([torch.tensor([1.0, math.nan])], [torch.ones(2)]), ([torch.tensor([1.0, math.inf])], [torch.ones(2)]),
                 ([torch.ones(2)], [torch.tensor([1.0, math.inf])]),
                 ([torch.zeros(2)], [torch.tensor([0.0, math.nan])])]:
        assert not math.isfinite(relative_changes(a, b).item())


def test_matrices_only_leaves_out_biases():
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.LayerNorm(3))
    before = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    rel = _direct(before, list(net.parameters()))
    dims = [p.dim() for p in net.parameters()]
    want = math.prod(1 + r for r, d in zip(rel, dims) if d >= 2) - 1
    assert deep_relative_trust(before, net, matrices_only=True).item() == pytest.approx(want, rel=1e-5)
    assert deep_relative_trust(before, net).item() == pytest.approx(math.prod(1 + r for r in rel) - 1, rel=1e-5)
    assert deep_relative_trust([torch.ones(3)], [torch.zeros(3)], matrices_only=True).item() == 0.0


def test_zero_norm_changed_is_inf():
    a = [torch.zeros(3), torch.ones(2, 2)]
    b = [torch.tensor([0.0, 1e-10, 0.0]), torch.ones(2, 2)]
    assert relative_changes(a, b).tolist() == [math.inf, 0.0]
    assert deep_relative_trust(a, b).item() == math.inf
    assert deep_relative_trust(a, a).item() == 0.0


def test_identical_and_scaled():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    assert deep_relative_trust(net, net).item() == 0.0
    b = [2 * p.detach() for p in net.parameters()]
    torch.testing.assert_close(relative_changes(net, b), torch.ones(4))
    assert deep_relative_trust(net, b).item() == pytest.approx(2 ** 4 - 1, rel=1e-6)


def test_complex_and_mixed_groups_keep_order():
    a = [torch.randn(4, dtype=torch.complex64), torch.randn(3, dtype=torch.float64), torch.randn(5)]
    b = [x * 1.5 for x in a]
    got = relative_changes(a, b)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-6, atol=0)


def test_b_is_cast_to_a():
    a = [torch.randn(6, 6)]
    b = [a[0].double() * 1.25]
    assert relative_changes(a, b).item() == pytest.approx(0.25, rel=1e-6)


def test_fromage_step_changes_each_tensor_by_lr():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 4)).double()
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(8, 10, dtype=torch.float64)).square().sum().backward()
    cos = torch.stack([(p * p.grad).sum() / (p.norm() * p.grad.norm()) for p in net.parameters()])
    lr = 0.01
    fromage_fused.Fromage(net.parameters(), lr=lr).step()
    got = relative_changes(before, net)
    # p' - p = ((1 - s) p - lr ||p|| g/||g||) / s with s = sqrt(1 + lr^2): lr to first order (eq. 6)
    s = math.sqrt(1 + lr * lr)
    exact = ((1 - s) ** 2 - 2 * (1 - s) * lr * cos + lr * lr).sqrt() / s
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=0)
    torch.testing.assert_close(got, torch.full((4,), lr, dtype=torch.float64), rtol=lr, atol=0)


def test_no_host_sync():
    a, b = _pair(torch.float32)
    with forbid_host_reads():
        r = relative_changes(a, b)
        d = deep_relative_trust(a, b)
    assert r.shape == (len(a),) and math.isfinite(d.item())


@pytest.mark.parametrize("make_b, match", [
    (lambda a: a[:-1], "has 12 tensors but params_b has 11"),
    (lambda a: a[:2] + [torch.zeros(4, 3, 3, 8)] + a[3:], r"tensor 2 has shape \(8, 3, 3, 3\)"),
    (lambda a: a[:1] + [torch.zeros(17, dtype=torch.int64)] + a[2:], "tensor 1 of params_b has dtype torch.int64"),
    (lambda a: a[:1] + ["x"] + a[2:], r"params_b\[1\] is a str"),
])
def test_mismatch_raises(make_b, match):
    a = mixed_tensors(torch.float32)
    with pytest.raises(ValueError, match=match):
        relative_changes(a, make_b(a))
    with pytest.raises(ValueError, match=match):
        deep_relative_trust(a, make_b(a))


def test_single_tensor_and_empty():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="single tensor"):
        relative_changes(x, x)
    assert relative_changes([], []).shape == (0,)
    assert deep_relative_trust([], []).item() == 0.0


@pytest.mark.parametrize("depth", [1, 2, 3, 8, 16, 50, 1000])
@pytest.mark.parametrize("cos_theta", [1.0, 0.5, 0.1, 1e-9, 0.0, -0.5])
def test_max_safe_lr_formula(depth, cos_theta):
    want = (1 + cos_theta) ** (1 / depth) - 1
    assert max_safe_lr(depth, cos_theta) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_max_safe_lr_per_layer_uses_the_smallest_cosine():
    cos = [0.9, 0.2, 0.7, 1.0]
    want = (1 + 0.2) ** (1 / 4) - 1
    assert max_safe_lr(4, cos) == pytest.approx(want, rel=1e-14)
    assert max_safe_lr(4, tuple(cos)) == pytest.approx(want, rel=1e-14)
    assert max_safe_lr(4, torch.tensor(cos, dtype=torch.float64)) == pytest.approx(want, rel=1e-14)
    assert max_safe_lr(3, [0.5, -1.0, 0.5]) == -1.0
    with pytest.raises(ValueError, match="3 cosines for depth 4"):
        max_safe_lr(4, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        max_safe_lr(2, [0.5, 1.5])
    with pytest.raises(ValueError):
        max_safe_lr(2, [0.5, "x"])
    with pytest.raises(ValueError):
        max_safe_lr(2, torch.ones(2, 1))


def test_max_safe_lr_defaults_and_limits():
    assert max_safe_lr(1) == 1.0
    assert max_safe_lr(2) == pytest.approx(math.sqrt(2) - 1, rel=1e-15)
    assert max_safe_lr(10 ** 6) == pytest.approx(math.log(2) / 10 ** 6, rel=1e-6)
    assert max_safe_lr(5, -1.0) == -1.0


@pytest.mark.parametrize("depth, cos_theta", [(0, 1.0), (-3, 1.0), (2.5, 1.0), (True, 1.0), ("4", 1.0),
                                              (4, 1.5), (4, -1.01), (4, float("nan")), (4, "1"), (4, None)])
def test_max_safe_lr_rejects(depth, cos_theta):
    with pytest.raises(ValueError):
        max_safe_lr(depth, cos_theta)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_float64_and_cpu_snapshots(dtype):
    a, b = _pair(dtype)
    a_cuda = [x.cuda() for x in a]
    want = torch.tensor(_direct(a, b), dtype=torch.float64)
    for other in ([y.cuda() for y in b], b):  # a snapshot kept on the CPU is moved to a's device
        got = relative_changes(a_cuda, other)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.double().cpu(), want, rtol=TRUST_RTOL[dtype], atol=0)
    mixed = a_cuda[:4] + a[4:]  # two devices: the result lives on the first tensor's
    torch.testing.assert_close(relative_changes(mixed, b).double().cpu(), want, rtol=TRUST_RTOL[dtype], atol=0)


def test_count_layers_both_ways():
    from fromage_fused.trust import count_layers

    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3, bias=False),
                              torch.nn.LayerNorm(3), torch.nn.Conv1d(3, 2, 2), torch.nn.Embedding(7, 2))
    # tensors: 2 (Linear) + 1 + 2 (LayerNorm) + 2 (Conv1d) + 1 (Embedding); matrices: Linear, Linear, Conv1d, Embedding
    assert count_layers(net) == 8
    assert count_layers(net, matrices_only=True) == 4
    assert count_layers(list(net.parameters())) == 8
    # The counts are deep_relative_trust's: moving every tensor by eta gives (1 + eta)^L - 1 with the same L
    # (a zero tensor scaled does not move: LayerNorm's bias is made nonzero first).
    torch.nn.init.constant_(net[3].bias, 0.5)
    moved = [p.detach() * 1.25 for p in net.parameters()]
    assert deep_relative_trust(net, moved).item() == pytest.approx(1.25 ** count_layers(net) - 1, rel=1e-6)
    assert (deep_relative_trust(net, moved, matrices_only=True).item()
            == pytest.approx(1.25 ** count_layers(net, matrices_only=True) - 1, rel=1e-6))
    assert max_safe_lr(count_layers(net)) < max_safe_lr(count_layers(net, matrices_only=True))
    assert count_layers([]) == 0
    with pytest.raises(ValueError, match="single tensor"):
        count_layers(torch.zeros(3, 3))
