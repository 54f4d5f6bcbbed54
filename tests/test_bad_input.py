"""Bad input gets a clear error and changes nothing: no parameter, no state, no param group."""
import copy
import math

import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage, functional
from fromage_fused import backends as registry
from fromage_fused.functional import UNSET_MAX_NORM
from fromage_fused.backends import Backend

BAD_LR = [-0.01, -1, math.nan, math.inf, -math.inf, "0.01", None, True, [0.01], {}, torch.tensor([0.01, 0.02]),
          torch.tensor(-0.01), torch.tensor(math.nan), torch.tensor(math.inf), torch.tensor(1)]
BAD_P_BOUND = [0, 0.0, -1.0, math.nan, math.inf, True, False, "1.0", torch.tensor(1.0)]


def snapshot(opt):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def assert_unchanged(opt, snap):
    state, params = snap
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    assert len(now) == len(params) and all(torch.equal(a, b) for a, b in zip(now, params))
    after = opt.state_dict()
    assert after["param_groups"] == state["param_groups"]
    assert after["state"].keys() == state["state"].keys()
    for k, v in state["state"].items():
        assert all(torch.equal(v[n], after["state"][k][n]) for n in v)


def trained():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = Fromage([{"params": net[0].parameters()}, {"params": net[1].parameters(), "lr": 0.02}], p_bound=2.0)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    net(torch.randn(5, 3)).sum().backward()
    return net, opt


@pytest.mark.parametrize("lr", BAD_LR, ids=repr)
def test_bad_lr(lr):
    with pytest.raises(ValueError, match="lr|learning rate"):
        Fromage([nn.Parameter(torch.randn(2))], lr=lr)
    net, opt = trained()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="lr|learning rate"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lr": lr})
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("lr", [-0.01, math.nan, math.inf, "0.01"], ids=repr)
def test_bad_lr_set_on_a_group_is_refused_at_step(lr):
    net, opt = trained()
    opt.param_groups[1]["lr"] = lr
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="lr|learning rate"):
        opt.step()
    assert_unchanged(opt, snap)


@pytest.mark.parametrize("lr", [-0.01, math.nan, math.inf, "0.01"], ids=repr)
def test_bad_lr_functional(lr):
    p, g = torch.randn(3), torch.randn(3)
    before = p.clone()
    with pytest.raises(ValueError):
        functional.fromage([p], [g], None, lr=lr, p_bound=None, maximize=False, backend="foreach")
    assert torch.equal(p, before)


@pytest.mark.parametrize("p_bound", BAD_P_BOUND, ids=repr)
def test_bad_p_bound(p_bound):
    with pytest.raises(ValueError, match="p_bound"):
        Fromage([nn.Parameter(torch.randn(2))], p_bound=p_bound)
    net, opt = trained()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="p_bound"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "p_bound": p_bound})
    assert_unchanged(opt, snap)
    p, mn = torch.randn(3), [torch.full((), UNSET_MAX_NORM)]
    with pytest.raises(ValueError, match="p_bound"):
        functional.fromage([p], [torch.randn(3)], mn, lr=0.01, p_bound=p_bound, maximize=False, backend="foreach")
    assert mn[0].item() == UNSET_MAX_NORM


def _steps_with(**kw):
    """An optimizer made with ``kw`` keeps the values as given and steps with them."""
    p = nn.Parameter(torch.randn(2))
    opt = Fromage([p], **kw)
    group = opt.param_groups[0]
    for name, value in kw.items():
        assert group[name] is value
    before = p.detach().clone()
    p.grad = torch.randn(2)
    opt.step()
    return before, p.detach()


def test_good_hyper_parameters_are_accepted():
    for lr in (0, 0.0, 1e-3, 2, torch.tensor(0.01), torch.tensor([0.01], dtype=torch.float64)):
        before, after = _steps_with(lr=lr)
        # lr 0 still applies the prefactor 1/sqrt(1 + 0) = 1 and moves nothing
        assert torch.equal(before, after) == (float(lr) == 0)
    for p_bound in (None, 1, 0.5, 1e6):
        before, after = _steps_with(p_bound=p_bound)
        assert not torch.equal(before, after)


def test_unknown_backend_names_the_choices():
    for name in ("nope", "", "Foreach"):
        with pytest.raises(ValueError) as info:
            Fromage([nn.Parameter(torch.randn(2))], backend=name)
        for choice in ["auto"] + fromage_fused.backend_names():
            assert repr(choice) in str(info.value)
    with pytest.raises(ValueError):
        Fromage([nn.Parameter(torch.randn(2))], backend=None)
    with pytest.raises(ValueError, match="foreach"):
        functional.fromage([torch.randn(2)], [torch.randn(2)], None, lr=0.01, backend="nope")


class _CudaOnly(Backend):
    name = "cuda-only-test"
    priority = 1000

    def unavailable_reason(self, device):
        return None if device.type == "cuda" else "it needs a CUDA device"


@pytest.fixture
def cuda_only(monkeypatch):
    backend = _CudaOnly()
    monkeypatch.setitem(registry._registry(), backend.name, backend)
    return backend


def test_named_backend_that_cannot_run_here_raises_at_construction(cuda_only):
    with pytest.raises(RuntimeError, match="cuda-only-test.*it needs a CUDA device"):
        Fromage([nn.Parameter(torch.randn(2))], backend="cuda-only-test")
    p = torch.randn(3)
    before = p.clone()
    with pytest.raises(RuntimeError, match="it needs a CUDA device"):
        functional.fromage([p], [torch.randn(3)], None, lr=0.01, backend="cuda-only-test")
    assert torch.equal(p, before)
    # and auto passes it over silently: it is not broken, it just does not run on CPU
    assert "cuda-only-test" not in fromage_fused.available_backends("cpu")
    assert registry.resolve("auto", "cpu").name == fromage_fused.available_backends("cpu")[0]


@pytest.mark.parametrize("where", [0, 1])
def test_sparse_gradient_refused_before_any_group_changes(where):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    lin = nn.Linear(3, 2)
    groups = [{"params": lin.parameters()}, {"params": emb.parameters(), "lr": 0.1}]
    opt = Fromage(groups[::-1] if where == 0 else groups, p_bound=1.0)
    lin(emb(torch.tensor([1, 2, 3]))).sum().backward()
    assert emb.weight.grad.is_sparse
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, snap)
    # p_bound groups hold unset max_norm state from construction; a refused step sets none of it
    assert all(float(st["max_norm"]) == UNSET_MAX_NORM for st in opt.state.values())


@pytest.mark.parametrize("bad, match", [
    (lambda p: torch.randn(4, dtype=torch.float64), "float64"),
    (lambda p: torch.randn(2, 2), "shape"),
    (lambda p: torch.randn(4, device="meta"), "meta"),
    (lambda p: torch.randn(4).to_sparse(), "sparse"),
])
def test_mismatched_gradient_functional(bad, match):
    params = [torch.randn(3), torch.randn(4), torch.randn(5)]
    grads = [torch.randn(3), bad(params[1]), torch.randn(5)]
    before = [p.clone() for p in params]
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params]
    with pytest.raises(RuntimeError, match=match):
        functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend="foreach")
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(m.item() == UNSET_MAX_NORM for m in mn)


def test_bad_max_norm_functional():
    params, grads = [torch.randn(3), torch.randn(4)], [torch.randn(3), torch.randn(4)]
    before = [p.clone() for p in params]
    for mn, exc in ([[torch.full((), -1.0), torch.full((), -1.0, dtype=torch.float64)], RuntimeError],
                    [[torch.full((), -1.0), torch.full((1,), -1.0)], RuntimeError],
                    [[torch.full((), -1.0)], ValueError],
                    [None, ValueError]):
        with pytest.raises(exc):
            functional.fromage(params, grads, mn, lr=0.01, p_bound=1.0, backend="foreach")
        assert all(torch.equal(a, b) for a, b in zip(params, before))
    with pytest.raises(ValueError):
        functional.fromage(params, grads[:1], None, lr=0.01, backend="foreach")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("named", [False, True], ids=["bare", "named"])
def test_integer_parameters(dtype, named):
    t = torch.zeros(3, dtype=dtype)
    given = [("w", t)] if named else [t]  # named: as model.named_parameters() gives them
    with pytest.raises(ValueError, match="floating-point"):
        Fromage(given)
    net, opt = trained()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="floating-point"):
        opt.add_param_group({"params": given})
    assert_unchanged(opt, snap)
    with pytest.raises(RuntimeError, match="floating-point"):
        functional.fromage([t], [torch.ones(3, dtype=dtype)], None, lr=0.01, backend="foreach")
    assert not t.any()


def test_add_param_group_validation():
    net, opt = trained()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": net[0].weight})
    with pytest.raises(TypeError):
        opt.add_param_group({"params": {nn.Parameter(torch.randn(2))}})
    assert_unchanged(opt, snap)
    extra = nn.Parameter(torch.randn(2))
    opt.add_param_group({"params": extra, "lr": torch.tensor(0.5)})
    assert opt.param_groups[-1]["p_bound"] == 2.0 and opt.param_groups[-1]["maximize"] is False


@pytest.mark.parametrize("flag", ["maximize", "prefactor", "stochastic_rounding"])
@pytest.mark.parametrize("value", ["False", "yes", None, 1.0])
def test_flags_must_be_bools(flag, value):
    # bool("False") is True: a flag given as a string would silently do the opposite.
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        Fromage([p], **{flag: value})
    net, opt = trained()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        opt.add_param_group({"params": [p], flag: value})
    assert_unchanged(opt, snap)


#: Every dtype a step cannot handle: float8 and float4 formats (no arithmetic of their own in torch),
#: complex32 (no real view every backend steps).
UNSTEPPABLE = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                           "float8_e8m0fnu",
                                           "float4_e2m1fn_x2") if hasattr(torch, n)] + [torch.complex32]


def _unsteppable(dtype, shape=(4,)):
    return torch.zeros(shape, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1 else torch.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", UNSTEPPABLE, ids=str)
@pytest.mark.parametrize("named", [False, True], ids=["bare", "named"])
def test_unsteppable_float_dtypes_are_refused_up_front(dtype, named):
    t = _unsteppable(dtype)
    given = [("w", t)] if named else [t]
    with pytest.raises(ValueError, match=f"cannot step {dtype}.*(bfloat16 or float32 master weights)"):
        Fromage(given)
    net, opt = trained()
    snap = snapshot(opt)
    with pytest.raises(ValueError, match="cannot step"):
        opt.add_param_group({"params": given})
    assert_unchanged(opt, snap)
    # the functional API: refused before any other tensor is touched
    params = [torch.randn(3), t, torch.randn(2)]
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match="cannot step"):
        functional.fromage(params, [torch.ones(3), _unsteppable(dtype), torch.ones(2)], None, lr=0.01,
                           backend="foreach")
    assert torch.equal(params[0], before[0]) and torch.equal(params[2], before[2])


@pytest.mark.parametrize("dtype", UNSTEPPABLE[:2], ids=str)
def test_a_parameter_cast_to_float8_after_construction_is_refused_before_any_group_steps(dtype):
    net, opt = trained()
    w = net[1].weight
    w.data = w.data.to(dtype)
    w.grad = None
    w.grad = torch.zeros(w.shape).to(dtype)
    snap = snapshot(opt)
    with pytest.raises(RuntimeError, match="cannot step"):
        opt.step()
    assert_unchanged(opt, snap)


BACKENDS = fromage_fused.available_backends("cpu")


def _exotic_numbers():
    """Real numbers of types other than int and float, each with its float value."""
    from fractions import Fraction

    out = [(Fraction(1, 10), 0.1), (Fraction(3, 2), 1.5)]
    np = pytest.importorskip("numpy")
    out += [(np.longdouble(0.1), float(np.longdouble(0.1))), (np.float32(1.5), 1.5), (np.int64(2), 2.0)]
    return out


def _two_groups(backend, dtype, **hyper):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3, dtype=dtype)), nn.Parameter(torch.randn(5, dtype=dtype))]
    opt = Fromage([{"params": params[:1]}, {"params": params[1:], **hyper}], lr=0.05, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_real_number_a_check_accepts_steps_as_its_float(backend, dtype):
    # Set on the second group after construction (re-checked at the step), and at construction:
    # the step uses the number's float value; it never fails half-way with group 0 changed.
    for value, as_float in _exotic_numbers():
        for key in ("lr", "p_bound"):
            results = []
            for v in (value, as_float):
                params, opt = _two_groups(backend, dtype, p_bound=1.0)
                opt.param_groups[1][key] = v
                opt.step()
                results.append([p.detach().clone() for p in params] + [opt.state[params[1]]["max_norm"].clone()])
                params, opt = _two_groups(backend, dtype, **{key: v, "p_bound": v if key == "p_bound" else 1.0})
                opt.step()
                results.append([p.detach().clone() for p in params] + [opt.state[params[1]]["max_norm"].clone()])
            for got in results[:2]:
                assert all(torch.equal(a, b) for a, b in zip(got, results[2])), (key, value)


@pytest.mark.parametrize("lr", [10 ** 400, -10 ** 400, 1e39, torch.tensor([0.01]).to_sparse(),
                                torch.tensor(1e39, dtype=torch.float64)],
                         ids=["10**400", "-10**400", "1e39", "sparse", "tensor-1e39"])
def test_numbers_a_step_cannot_use_are_refused_up_front(lr):
    with pytest.raises(ValueError, match="lr|learning rate"):
        Fromage([nn.Parameter(torch.randn(2))], lr=lr)
    net, opt = trained()
    snap = snapshot(opt)
    if not isinstance(lr, torch.Tensor):  # (a tensor's value is read at construction only)
        opt.param_groups[1]["lr"] = lr
        with pytest.raises(ValueError, match="lr|learning rate"):
            opt.step()
        opt.param_groups[1]["lr"] = 0.02
    assert_unchanged(opt, snap)
    with pytest.raises(ValueError, match="p_bound"):
        Fromage([nn.Parameter(torch.randn(2))], p_bound=10 ** 400)
