"""The cpu backend runs a pass and the next one tensor block by tensor block (``pass_pair``) where
the next reads only each tensor's own sums of the first: the results must be bit for bit those of
the two passes one after the other, for every rule, dtype and block size, and the executor must
keep the passes apart wherever something between them needs every tensor's sums."""
import pytest
import torch

from _native import require_native
from fromage_fused import LAMB, LARS, Fromage
from fromage_fused.backends import native
from fromage_fused.rules.fromage import functional as fromage_functional

pytestmark = pytest.mark.filterwarnings("ignore:p_bound sets each tensor:UserWarning")
STEPS = 12
# multi-chunk tensors (over 32K elements), odd sizes, a zero-initialised one, one element
SHAPES = [(300, 200), (7,), (70_001,), (3, 5), (40_000, 3), (1,), (33,)]

RULES = {
    "fromage": lambda ps: Fromage(ps, lr=0.01, backend="cpu"),
    "fromage-p_bound": lambda ps: Fromage(ps, lr=0.01, p_bound=2.0, backend="cpu"),
    "fromage-no-prefactor-maximize": lambda ps: Fromage(ps, lr=0.01, prefactor=False, maximize=True, backend="cpu"),
    "lars-momentum": lambda ps: LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, backend="cpu"),
    "lars-nesterov-clip": lambda ps: LARS(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, trust_clip=True,
                                          backend="cpu"),
    "lars-plain": lambda ps: LARS(ps, lr=0.1, momentum=0.0, weight_decay=1e-4, backend="cpu"),
    "lamb": lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01, backend="cpu"),
    "lamb-caution-decoupled": lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01, caution=True, decoupled_decay=True,
                                              backend="cpu"),
    "lamb-no-clip-always-adapt": lambda ps: LAMB(ps, lr=0.01, weight_decay=0.0, always_adapt=True, max_grad_norm=None,
                                                 backend="cpu"),
}


@pytest.fixture
def pair_calls(monkeypatch):
    require_native()
    calls = []
    run_pair = native.NativeBackend.run_pair

    def counted(self, rule, index, call):
        calls.append((rule.name, index))
        return run_pair(self, rule, index, call)

    monkeypatch.setattr(native.NativeBackend, "run_pair", counted)
    return calls


def _train(make, dtype, pairs, monkeypatch, groups=1):
    torch.manual_seed(0)
    params = [torch.randn(s).to(dtype).requires_grad_() for s in SHAPES]
    params[1].data.zero_()
    if groups == 2:
        opt = make([{"params": params[:3]}, {"params": params[3:]}])
    else:
        opt = make(params)
    with monkeypatch.context() as m:
        if not pairs:
            m.setattr(native.NativeBackend, "pairs", lambda self, call: False)
        for k in range(STEPS):
            for i, p in enumerate(params):
                # None and zero gradients on a schedule
                p.grad = None if (k + i) % 5 == 0 else torch.randn_like(p) * (0 if (k + i) % 7 == 0 else 1)
            opt.step()
    return [p.detach().clone() for p in params], [
        {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]


def _assert_same(a, b):
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        assert torch.equal(x, y), f"parameter {i} differs"
    for i, (x, y) in enumerate(zip(a[1], b[1])):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"the state of parameter {i} differs"


@pytest.mark.parametrize("block_bytes", [1, 600_000, native.PAIR_BLOCK_BYTES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_paired_passes_step_bit_for_bit_as_separate_ones(rule, dtype, block_bytes, pair_calls, monkeypatch):
    # 1 byte: each tensor its own block; 600 KB: blocks of several tensors and of one large one
    monkeypatch.setattr(native, "PAIR_BLOCK_BYTES", block_bytes)
    paired = _train(RULES[rule], dtype, True, monkeypatch, groups=2)
    assert len(pair_calls) == 2 * STEPS, "the passes did not run paired"
    pair_calls.clear()
    _assert_same(paired, _train(RULES[rule], dtype, False, monkeypatch, groups=2))
    assert not pair_calls


def test_lamb_pairs_its_moments_and_update_not_its_gradient_norm(pair_calls, monkeypatch):
    _train(RULES["lamb"], torch.float32, True, monkeypatch)
    assert set(pair_calls) == {("lamb", 1)} and len(pair_calls) == STEPS


@pytest.mark.parametrize("rule", ["lars-momentum", "lamb"])
def test_monitoring_keeps_apart_what_needs_the_updates_sums(rule, pair_calls, monkeypatch):
    # LARS's update pass sums ‖u‖² while monitoring: it has sums of its own, so it runs alone.
    # LAMB's update pass has none: its moments and update still run paired.
    make = RULES[rule]

    def monitored(params):
        opt = make(params)
        opt.monitor = True
        return opt

    got = _train(monitored, torch.float32, True, monkeypatch)
    assert len(pair_calls) == (0 if rule.startswith("lars") else STEPS)
    _assert_same(got, _train(make, torch.float32, False, monkeypatch))


def test_stochastic_rounding_keeps_the_passes_apart(pair_calls, monkeypatch):
    make = RULES["lamb"]
    _train(lambda ps: LAMB(ps, lr=0.01, weight_decay=0.01, stochastic_rounding=True, backend="cpu"),
           torch.bfloat16, True, monkeypatch)
    assert not pair_calls
    _train(make, torch.bfloat16, True, monkeypatch)  # the same without it pairs
    assert pair_calls


def test_a_callers_reduce_stats_keeps_the_passes_apart(pair_calls):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    grads = [torch.randn_like(p) for p in params]
    seen = []

    def reduce_stats(stats, group):
        seen.append(stats.clone())
        return stats * 4  # as if 4 ranks held the same shard

    groups = fromage_functional.plan(params, grads, None, backend="cpu")
    fromage_functional.step_groups(groups, lr=0.01, reduce_stats=reduce_stats)
    assert seen and not pair_calls


def _fromage_pair(params, grads, block_bytes, *, following=None):
    """Fromage's stats and apply through ``pass_pair`` (lr 0.01, prefactor, no p_bound); ``following``:
    the apply pass's (params, grads) when not the same."""
    from fromage_fused.rules.fromage.flags import INNER, PREFACTOR

    hyper = torch.tensor([0.01, 0.0])
    params_next, grads_next = following or (params, grads)
    return torch.ops.fromage_fused.pass_pair(
        "fromage", 0, [], list(params) + list(grads), list(params_next), list(grads_next), None, hyper,
        INNER | PREFACTOR, [], None, None, None, None, block_bytes)


def test_the_op_gives_the_first_passes_sums_and_the_second_passes_results():
    from _native import fromage_apply_op, fromage_stats_op

    require_native()
    torch.manual_seed(0)
    params = [torch.randn(n) for n in (100_000, 33, 65_537, 1)]
    grads = [torch.randn_like(p) for p in params]
    apart = [p.clone() for p in params]
    stats = fromage_stats_op(apart, grads, True)
    fromage_apply_op(apart, grads, stats, torch.tensor(0.01), None, None, False, True, None, None, None)
    for block_bytes in (1, 500_000, 1 << 30):
        together = [p.clone() for p in params]
        sums = _fromage_pair(together, grads, block_bytes)
        assert torch.equal(sums, stats)
        assert all(torch.equal(a, b) for a, b in zip(together, apart))


def test_a_bad_argument_of_a_later_block_changes_nothing():
    require_native()
    torch.manual_seed(0)
    params = [torch.randn(1000) for _ in range(4)]
    grads = [torch.randn_like(p) for p in params]
    bad = grads[:3] + [grads[3].double()]  # the second pass's last gradient: another dtype
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match="tensor 3 of list 1 is Double"):
        _fromage_pair(params, grads, 1, following=(params, bad))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    with pytest.raises(RuntimeError, match=r"stats must be \[3, 3\]"):  # the second pass has 3 tensors, not 4
        _fromage_pair(params, grads, 1, following=(params[:3], grads[:3]))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
