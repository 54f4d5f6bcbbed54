"""bf16 parameters with stochastic rounding: unbiased, reproducible, and it trains where
round-to-nearest loses Fromage's small relative updates."""
import pytest
import torch
from torch import nn

from fromage_fused import Fromage, functional
from _training_setup import assert_same, loss_of, make, one_thread, snapshot

#: Unbiasedness check, as data: draws per element, and the bounds in bf16 ulps of the exact
#: result. One draw's error has std <= ulp/2, so the mean of N has std <= ulp/(2*sqrt(N)).
DRAWS = 256
MEAN_BIAS_ULPS = 0.01            # averaged over all elements
ELEMENT_BOUND_ULPS = 6 * 0.5 / DRAWS ** 0.5
#: digits run: SR must keep this fraction of the fp32 run's loss decrease, and round-to-nearest is
#: expected to keep less than STALLED of it (lr 5e-4 is about an eighth of a bf16 ulp).
TRACK_RTOL = 0.05
STALLED = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def bf16_ulp(x):
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 8)


@pytest.mark.backends(interpreted=False)
def test_unbiased_in_expectation(backend):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(4099, generator=gen).to(torch.bfloat16)
    g = torch.randn(4099, generator=gen).to(torch.bfloat16)
    lr = 1e-3  # a quarter of a bf16 ulp: round-to-nearest keeps almost nothing
    exact = p.float()
    functional.fromage([exact], [g.float()], None, lr=lr, backend="reference")
    total = torch.zeros(p.shape, dtype=torch.float64)
    for k in range(DRAWS):
        q = p.clone()
        functional.fromage([q], [g], None, lr=lr, backend=backend, sr_seed=torch.tensor(k))
        total += q.double()
    mean = total / DRAWS
    err_ulps = (mean - exact.double()) / bf16_ulp(exact).double()
    assert err_ulps.mean().abs() < MEAN_BIAS_ULPS
    assert err_ulps.abs().max() < ELEMENT_BOUND_ULPS
    update = exact.double() - p.double()
    assert (mean - exact.double()).norm() < 0.25 * update.norm()  # noise of the mean: about 0.1
    nearest = p.clone()
    functional.fromage([nearest], [g], None, lr=lr, backend=backend)
    assert (nearest.double() - exact.double()).norm() > 0.5 * update.norm()


def run(seed, steps=4, torch_seed=None):
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
        model, opt = make(seed=None, init_seed=0) if seed is None else make(seed=seed)
    else:
        model, opt = make(seed=seed)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    return model, opt


def test_fixed_seed_reproduces_and_seeds_differ():
    a, b, c = run(7), run(7), run(8)
    assert_same(snapshot(*a), snapshot(*b))
    assert not torch.equal(a[0].low, c[0].low)
    # Without a seed, torch's generator seeds it: torch.manual_seed reproduces the run.
    def unseeded(s):
        torch.manual_seed(s)
        return Fromage([nn.Parameter(torch.ones(2))], stochastic_rounding=True)._sr_base
    assert unseeded(3) == unseeded(3) != unseeded(4)


def test_constructing_without_rounding_leaves_torch_generator_alone():
    # A drop-in optimizer: building it must not shift the random stream a training run draws
    # from afterwards (data order, dropout), unless stochastic rounding needs a seed from it.
    def next_draw(**kwargs):
        torch.manual_seed(5)
        opt = Fromage([nn.Parameter(torch.ones(2))], **kwargs)
        return torch.rand(()).item(), opt

    torch.manual_seed(5)
    untouched = torch.rand(()).item()
    assert next_draw()[0] == untouched
    assert next_draw(stochastic_rounding=True)[0] != untouched
    # rounding switched on after construction: the seed is drawn when first needed
    _, opt = next_draw()
    low = nn.Parameter(torch.randn(5).to(torch.bfloat16))
    opt.add_param_group({"params": [low], "stochastic_rounding": True})
    low.grad = torch.randn(5).to(torch.bfloat16)
    opt.step()
    assert "sr_seed" in opt.state[low]


def test_seed_advances_on_the_device_each_step():
    model, opt = run(7, steps=1)
    seed = opt.state[model.low]["sr_seed"]
    assert seed.dtype == torch.int64 and seed.dim() == 0
    first = seed.clone()
    opt.zero_grad()
    loss_of(model, 1).backward()
    opt.step()
    assert opt.state[model.low]["sr_seed"] is seed and seed.item() == first.item() + 1


def test_groups_get_distinct_seeds():
    low = [nn.Parameter(torch.randn(5).to(torch.bfloat16)) for _ in range(2)]
    opt = Fromage([{"params": [low[0]]}, {"params": [low[1]]}], stochastic_rounding=True, seed=1, backend="foreach")
    for p in low:
        p.grad = torch.randn(5).to(torch.bfloat16)
    opt.step()
    assert opt.state[low[0]]["sr_seed"].item() != opt.state[low[1]]["sr_seed"].item()


def test_state_dict_resumes_the_random_stream():
    model, opt = run(7, steps=3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()
    resumed_model, resumed_opt = make(seed=123)
    resumed_model.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    assert all(g["stochastic_rounding"] == (i == 2) for i, g in enumerate(resumed_opt.param_groups))
    for m, o in ((model, opt), (resumed_model, resumed_opt)):
        for step in range(3, 6):
            o.zero_grad()
            loss_of(m, step).backward()
            o.step()
    assert_same(snapshot(model, opt), snapshot(resumed_model, resumed_opt))


def test_loads_a_state_dict_saved_before_the_option():
    model, opt = run(7, steps=1)
    old = opt.state_dict()
    for g in old["param_groups"]:
        del g["stochastic_rounding"]
    model2, opt2 = make(seed=7)
    opt2.load_state_dict(old)
    assert [g["stochastic_rounding"] for g in opt2.param_groups] == [False, False, False]
    opt2.zero_grad()
    loss_of(model2, 1).backward()
    opt2.step()


def test_off_by_default_and_ignored_for_other_dtypes():
    p = nn.Parameter(torch.randn(9).to(torch.bfloat16))
    w = nn.Parameter(torch.randn(9))
    results = []
    for sr, seed in ((False, 1), (False, 2)):
        q, v = nn.Parameter(p.detach().clone()), nn.Parameter(w.detach().clone())
        opt = Fromage([q, v], lr=0.05, stochastic_rounding=sr, seed=seed, backend="foreach")
        q.grad, v.grad = torch.ones_like(q), torch.ones_like(v)
        opt.step()
        results.append((q.detach().clone(), v.detach().clone()))
        assert "sr_seed" not in opt.state[q]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    v2 = nn.Parameter(w.detach().clone())
    opt = Fromage([v2], lr=0.05, stochastic_rounding=True, backend="foreach")
    v2.grad = torch.ones_like(v2)
    opt.step()
    assert torch.equal(v2.detach(), results[0][1]) and "sr_seed" not in opt.state[v2]
    with pytest.raises(ValueError, match="seed"):
        Fromage([v2], seed="7")


def _digits_losses(dtype, stochastic_rounding, lr=5e-4, steps=100):
    from fromage_fused.demo import load_digits

    (x, y), _ = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)
    opt = Fromage(model.parameters(), lr=lr, stochastic_rounding=stochastic_rounding, seed=1, backend="foreach")
    x, losses = x.to(dtype), []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


def test_bf16_training_tracks_fp32():
    fp32 = _digits_losses(torch.float32, False)
    sr = _digits_losses(torch.bfloat16, True)
    nearest = _digits_losses(torch.bfloat16, False)
    drop = fp32[0] - fp32[-1]
    assert drop > 0.02
    assert (sr - fp32).abs().max() < TRACK_RTOL * drop
    assert nearest[0] - nearest[-1] < STALLED * drop


def test_copies_keep_backend_and_seed():
    import copy
    import pickle

    model, opt = run(7, steps=2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.backend == opt.backend and clone._sr_base == opt._sr_base
        assert [g["stochastic_rounding"] for g in clone.param_groups] == [False, False, True]
    with pytest.raises(ValueError, match="stochastic_rounding"):
        Fromage([nn.Parameter(torch.ones(2))], stochastic_rounding="yes")
