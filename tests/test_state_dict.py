"""state_dict: saving and loading mid-training continues exactly; hyper-parameters and state come back."""
import copy
import io

import pytest
import torch
from torch import nn

from conftest import backend_cases
from fromage_fused import Fromage

BACKENDS = [name for _, name in backend_cases(("cpu",))]


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def make(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    nn.init.zeros_(net[2].bias)
    return net


def train(net, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(net.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(8, 4, generator=gen).to(dtype)).square().mean().backward()
        opt.step()


def groups(net, lr, p_bound, maximize):
    return [{"params": net[0].parameters(), "lr": lr},
            {"params": net[2].parameters(), "lr": 0.03, "p_bound": 2.5, "maximize": not maximize}]


@pytest.mark.parametrize("p_bound", [None, 1.5])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_resume_is_bit_identical(backend, p_bound, tensor_lr):
    lr = torch.tensor(0.02) if tensor_lr else 0.02
    net = make()
    opt = Fromage(groups(net, lr, p_bound, False), lr=lr, p_bound=p_bound, backend=backend)
    train(net, opt, 3, seed=1)
    saved_model, saved_opt = save_load(net.state_dict()), save_load(opt.state_dict())

    train(net, opt, 4, seed=2)  # the uninterrupted run

    resumed = make()
    resumed.load_state_dict(saved_model)
    opt2 = Fromage(groups(resumed, 0.5, None, True), lr=0.5, backend=backend)  # different hypers
    opt2.load_state_dict(saved_opt)
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        for key in ("lr", "p_bound", "maximize"):
            assert type(g1[key]) is type(g2[key]) and (
                torch.equal(g1[key], g2[key]) if torch.is_tensor(g1[key]) else g1[key] == g2[key])
    train(resumed, opt2, 4, seed=2)
    for a, b in zip(net.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["state"].keys() == sd2["state"].keys()
    for k in sd1["state"]:
        for name, v in sd1["state"][k].items():
            assert torch.equal(v, sd2["state"][k][name])


def test_hyper_parameters_in_the_state_dict():
    net = make()
    opt = Fromage(groups(net, 0.02, 1.5, True), lr=0.1, p_bound=1.5, maximize=True)
    sd = save_load(opt.state_dict())
    assert ([(g["lr"], g["p_bound"], g["maximize"]) for g in sd["param_groups"]]
            == [(0.02, 1.5, True), (0.03, 2.5, False)])
    opt2 = Fromage(make().parameters())
    with pytest.raises(ValueError):  # two groups saved, one here
        opt2.load_state_dict(sd)


@pytest.mark.parametrize("src, dst", [(a, b) for a in BACKENDS for b in BACKENDS if a != b])
def test_state_saved_with_one_backend_loads_into_another(src, dst):
    net = make()
    opt = Fromage(net.parameters(), lr=0.02, p_bound=1.0, backend=src)
    train(net, opt, 3, seed=1)
    twin = copy.deepcopy(net)
    twin_opt = Fromage(twin.parameters(), backend=dst)
    twin_opt.load_state_dict(save_load(opt.state_dict()))
    assert twin_opt.backend == dst and twin_opt.param_groups[0]["p_bound"] == 1.0
    train(net, opt, 3, seed=2)
    train(twin, twin_opt, 3, seed=2)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert net[2].bias.abs().max().item() == 0 and twin[2].bias.abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.complex64, torch.float64])
def test_max_norm_stays_float32_after_load(dtype):
    p = nn.Parameter(torch.randn(5, dtype=dtype))
    opt = Fromage([p], p_bound=1.0)
    p.grad = torch.randn_like(p)
    opt.step()
    want = opt.state[p]["max_norm"].clone()
    assert want.dtype == torch.float32 and want.shape == ()
    opt2 = Fromage([p], p_bound=1.0)
    opt2.load_state_dict(save_load(opt.state_dict()))
    got = opt2.state[p]["max_norm"]
    assert got.dtype == torch.float32 and got.shape == () and got.device == p.device
    assert torch.equal(got, want)
    p.grad = torch.randn_like(p)
    opt2.step()  # and it steps with it
    assert torch.equal(opt2.state[p]["max_norm"], want)


def test_tensor_lr_round_trip():
    p = nn.Parameter(torch.randn(3))
    lr = torch.tensor(0.0123, dtype=torch.float64)
    opt = Fromage([p], lr=lr)
    sd = save_load(opt.state_dict())
    assert torch.is_tensor(sd["param_groups"][0]["lr"])
    opt2 = Fromage([p], lr=0.5)
    opt2.load_state_dict(sd)
    got = opt2.param_groups[0]["lr"]
    assert torch.is_tensor(got) and got.dtype == torch.float64 and torch.equal(got, lr)


def test_missing_group_keys_take_the_constructors_defaults():
    # e.g. written by a Fromage that had no maximize/p_bound group entries: as torch does for its
    # own optimizers' new options, a missing key takes the value this optimizer was built with
    net = make()
    opt = Fromage(net.parameters(), lr=0.02)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["maximize"], g["p_bound"]
    net2 = make()
    opt2 = Fromage(net2.parameters(), lr=0.5, p_bound=3.0, maximize=True)
    opt2.load_state_dict(sd)
    group = opt2.param_groups[0]
    assert group["maximize"] is True and group["p_bound"] == 3.0 and group["lr"] == 0.02
    # the bounded group has its (unset) max_norm state, as one built with the bound would
    assert all(float(opt2.state[p]["max_norm"]) == -1.0 for p in group["params"])
    train(net2, opt2, 1, seed=0)
    assert all(float(opt2.state[p]["max_norm"]) > 0 for p in group["params"] if p.abs().sum() > 0)


def _authors_state_dict(params, lr, max_norms):
    """A state_dict in the reference implementation's format: groups hold lr and params only, and a
    parameter stepped with p_bound set keeps the bound as a Python float under "max"."""
    return {"state": {i: {"max": m} for i, m in enumerate(max_norms) if m is not None},
            "param_groups": [{"lr": lr, "params": list(range(len(params)))}]}


def test_authors_checkpoint_keeps_its_bound(backend):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))]
    # their run: p_bound = 1.0, so max = ||p|| at the first step; the last tensor was never stepped
    bounds = [float(params[0].detach().norm()) * 1.02, float(params[1].detach().norm()), None]
    opt = Fromage(params, lr=0.5, p_bound=1.0, maximize=True, backend=backend)
    opt.load_state_dict(_authors_state_dict(params, 0.1, bounds))
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["p_bound"] == 1.0 and group["maximize"] is True
    for p, m in zip(params[:2], bounds[:2]):
        assert "max" not in opt.state[p]
        got = opt.state[p]["max_norm"]
        assert (got.dtype == torch.float32 and got.shape == ()
                and got.item() == torch.tensor(m, dtype=torch.float32).item())
    assert float(opt.state[params[2]]["max_norm"]) == -1.0  # unset: set at its first step here
    first = float(params[2].detach().norm())
    for _ in range(20):  # ascent along each tensor's own direction grows its norm every step
        for p in params:
            p.grad = p.detach().clone()
        opt.step()
    for p, m in zip(params[:2], bounds[:2]):
        assert float(p.norm()) <= m * (1 + 1e-6)
        assert float(p.norm()) > 0.99 * m  # it did grow up to the bound
    assert float(params[2].norm()) <= first * (1 + 1e-6)
    # and the state round-trips in this implementation's format
    sd = save_load(opt.state_dict())
    assert all(set(v) == {"max_norm"} for v in sd["state"].values())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["foreach"])
def test_cpu_state_loads_onto_cuda(backend):
    net = make()
    opt = Fromage(net.parameters(), lr=0.02, p_bound=1.0, backend=backend)
    train(net, opt, 2, seed=1)
    gpu = copy.deepcopy(net).cuda()
    gpu_opt = Fromage(gpu.parameters(), backend=backend)
    gpu_opt.load_state_dict(save_load(opt.state_dict()))
    for p in gpu.parameters():
        assert gpu_opt.state[p]["max_norm"].device == p.device and gpu_opt.state[p]["max_norm"].dtype == torch.float32
    train(net, opt, 2, seed=2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        gpu_opt.zero_grad()
        gpu(torch.randn(8, 4, generator=gen).cuda()).square().mean().backward()
        gpu_opt.step()
    for a, b in zip(net.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)


def _assert_same_state_dict(a, b):
    assert [sorted(g) for g in a["param_groups"]] == [sorted(g) for g in b["param_groups"]]
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        assert all(torch.equal(v, b["state"][k][n]) for n, v in a["state"][k].items())


@pytest.mark.parametrize("dst", BACKENDS)
def test_a_load_gives_back_the_state_dict_it_loaded(dst):
    # The param groups hold Fromage's keys only: torch's own options (differentiable, ...) are no
    # hyper-parameters of Fromage and must not appear after a load.
    net = make()
    opt = Fromage(groups(net, 0.02, 1.5, False), lr=0.02, p_bound=1.5, backend="foreach")
    train(net, opt, 2, seed=1)
    saved = save_load(opt.state_dict())
    opt.load_state_dict(copy.deepcopy(saved))
    _assert_same_state_dict(opt.state_dict(), saved)
    other = Fromage(groups(make(), 0.5, None, True), lr=0.5, backend=dst)
    other.load_state_dict(copy.deepcopy(saved))
    _assert_same_state_dict(other.state_dict(), saved)
    assert all(set(g) == {"params", "lr", "p_bound", "maximize", "prefactor", "stochastic_rounding", "weight_decay"}
               for g in other.state_dict()["param_groups"])


def _bounded(backend="foreach", rounding=False):
    net = make()
    opt = Fromage(groups(net, 0.02, 1.5, False), lr=0.02, p_bound=1.5, backend=backend,
                  stochastic_rounding=rounding, seed=1)
    train(net, opt, 2, seed=1)
    return net, opt


def _state_of(net, opt):
    sd = opt.state_dict()
    return (copy.deepcopy(sd["param_groups"]),
            {k: {n: v.clone() for n, v in e.items()} for k, e in sd["state"].items()},
            [p.detach().clone() for p in net.parameters()])


def _set_state(key, value):
    def edit(sd):
        sd["state"][0][key] = value
    return edit


def _set_group(key, value):
    def edit(sd):
        sd["param_groups"][1][key] = value
    return edit


def _not_a_dict(sd):
    sd["state"][1] = 3.0


BAD_LOADS = {
    "max_norm_two_values": _set_state("max_norm", torch.tensor([1.0, 2.0])),
    "max_norm_string": _set_state("max_norm", "1.0"),
    "max_norm_nan": _set_state("max_norm", torch.tensor(float("nan"))),
    "max_norm_inf": _set_state("max_norm", float("inf")),
    "max_norm_negative": _set_state("max_norm", -0.5),
    "max_norm_beyond_float32": _set_state("max_norm", 1e39),
    "sr_seed_beyond_int64": _set_state("sr_seed", 2 ** 70),
    "sr_seed_float": _set_state("sr_seed", torch.tensor(1.5)),
    "state_not_a_dict": _not_a_dict,
    "group_lr_nan": _set_group("lr", float("nan")),
    "group_lr_tensor_negative": _set_group("lr", torch.tensor(-0.1)),
    "group_p_bound_negative": _set_group("p_bound", -1.0),
    "group_weight_decay_negative": _set_group("weight_decay", -0.1),
    "group_weight_decay_nan": _set_group("weight_decay", float("nan")),
    "group_flag_string": _set_group("maximize", "False"),
}


@pytest.mark.parametrize("case", list(BAD_LOADS))
def test_a_load_that_raises_changes_nothing(case):
    net, opt = _bounded(rounding=case.startswith("sr_seed"))
    twin_net, twin_opt = copy.deepcopy((net, opt))
    before = _state_of(net, opt)
    sd = copy.deepcopy(opt.state_dict())
    BAD_LOADS[case](sd)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    after = _state_of(net, opt)
    assert before[0] == after[0] and before[1].keys() == after[1].keys()
    assert all(e.keys() == after[1][k].keys() and all(torch.equal(v, after[1][k][n]) for n, v in e.items())
               for k, e in before[1].items())
    train(net, opt, 2, seed=3)  # and it steps on as if nothing had been tried
    train(twin_net, twin_opt, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin_net.parameters()))


def test_the_unset_marker_loads():
    net, opt = _bounded()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["max_norm"] = torch.tensor(-1.0)
    sd["state"][1]["max_norm"] = 0.0
    opt.load_state_dict(sd)
    p0, p1 = list(net[0].parameters())
    assert opt.state[p0]["max_norm"].item() == -1.0 and opt.state[p1]["max_norm"].item() == 0.0
