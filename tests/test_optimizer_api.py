"""The checks PyTorch runs on its own optimizers, as plain pytest."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook

from fromage_fused import Fromage



def problem(seed=0):
    """A small least-squares regression with a hidden layer."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen)
    y = torch.sin(x @ torch.randn(5, 1, generator=gen))
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    return net, (lambda: nn.functional.mse_loss(net(x), y))


def closure_for(opt, loss_fn):
    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss
    return closure


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("maximize", [False, True])
def test_loss_goes_down_or_up_with_maximize(backend, maximize):
    net, loss_fn = problem()
    opt = Fromage(net.parameters(), lr=0.05, maximize=maximize, backend=backend)
    first = loss_fn().item()
    closure = closure_for(opt, loss_fn)
    for _ in range(40):
        opt.step(closure)
    last = loss_fn().item()
    if maximize:
        assert last > 2 * first
    else:
        assert last < 0.5 * first


def test_closure_loss_is_returned():
    net, loss_fn = problem()
    opt = Fromage(net.parameters())
    sentinel = []

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        sentinel.append(loss)
        return loss
    assert opt.step(closure) is sentinel[-1]
    net[0].weight.grad = torch.ones_like(net[0].weight)
    assert opt.step() is None


def test_param_groups_with_different_lr():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(10))
    opt = Fromage([{"params": [a]}, {"params": [b], "lr": 0.1}], lr=0.01)
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.randn(10), torch.randn(10)
    opt.step()
    ra = (a.detach() - a0).norm() / a0.norm()
    rb = (b.detach() - b0).norm() / b0.norm()
    assert ra == pytest.approx(0.01, rel=0.01) and rb == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tensor_lr_equals_float_lr(backend, dtype):
    # lr as a tensor in the accumulation dtype is the same number as the float (0.25 is exact).
    runs = []
    for lr in (0.25, torch.tensor(0.25)):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(7, 3, dtype=dtype)), nn.Parameter(torch.zeros(4, dtype=dtype))]
        opt = Fromage(ps, lr=lr, p_bound=1.2, backend=backend)
        for step in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        runs.append([p.detach() for p in ps])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p_bound", [None, 0.9])
def test_complex_equals_its_real_view(backend, p_bound):
    torch.manual_seed(0)
    z = nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt_z = Fromage([z], lr=0.1, p_bound=p_bound, backend=backend)
    opt_r = Fromage([r], lr=0.1, p_bound=p_bound, backend=backend)
    for _ in range(3):
        gz = torch.randn(4, 3, dtype=torch.complex64)
        z.grad, r.grad = gz, torch.view_as_real(gz).clone()
        opt_z.step()
        opt_r.step()
        assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    if p_bound is not None:
        assert torch.equal(opt_z.state[z]["max_norm"], opt_r.state[r]["max_norm"])


def test_frozen_parameter_and_none_grad_are_left_alone():
    net, loss_fn = problem()
    net[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in net[0].parameters()]
    opt = Fromage(net.parameters(), p_bound=1.0)
    opt.step(closure_for(opt, loss_fn))
    assert all(torch.equal(a, b) for a, b in zip(frozen, net[0].parameters()))
    # p_bound groups hold max_norm state from construction; only stepped tensors have it set
    assert {p for p, st in opt.state.items() if float(st["max_norm"]) >= 0} == set(net[2].parameters())


def test_zero_grad_set_to_none_and_to_zero():
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = Fromage([p], lr=0.1)
    p.grad = torch.tensor([1.0, 0.0])
    opt.zero_grad(set_to_none=True)
    assert p.grad is None
    opt.step()  # no gradient: nothing happens, not even the prefactor
    assert p.detach().tolist() == [3.0, 4.0]
    p.grad = torch.tensor([1.0, 0.0])
    opt.zero_grad(set_to_none=False)
    assert p.grad is not None and not p.grad.any()
    opt.step()  # an all-zero gradient is a gradient: the prefactor shrinks p
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0]) / 1.01 ** 0.5)


@pytest.mark.parametrize("make", [
    lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5),
    lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10, cycle_momentum=False),
    lambda o: lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e)),
], ids=["step", "exponential", "cosine", "onecycle", "lambda"])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_schedulers(make, tensor_lr):
    net, loss_fn = problem()
    opt = Fromage(net.parameters(), lr=torch.tensor(0.02) if tensor_lr else 0.02)
    sched = make(opt)
    lrs = []
    closure = closure_for(opt, loss_fn)
    for _ in range(6):
        opt.step(closure)
        sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    assert len(set(lrs)) > 1
    assert torch.is_tensor(opt.param_groups[0]["lr"]) == tensor_lr


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_reduce_lr_on_plateau(tensor_lr):
    net, loss_fn = problem()
    opt = Fromage(net.parameters(), lr=torch.tensor(0.02) if tensor_lr else 0.02)
    sched = lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    for loss in (1.0, 1.0, 1.0, 1.0):
        sched.step(loss)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.01)
    opt.step(closure_for(opt, loss_fn))  # and the reduced lr steps


def test_repr():
    opt = Fromage([nn.Parameter(torch.randn(2))], lr=0.02, p_bound=1.5, maximize=True)
    text = repr(opt)
    assert text.startswith("Fromage (") and "lr: 0.02" in text and "p_bound: 1.5" in text and "maximize: True" in text
    assert str(opt) == text


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_deepcopy_and_pickle(backend):
    net, loss_fn = problem()
    opt = Fromage(net.parameters(), lr=0.02, p_bound=1.0, backend=backend)
    opt.step(closure_for(opt, loss_fn))
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.backend == backend
        assert {k: clone.defaults[k] for k in opt.defaults} == opt.defaults
        assert clone.param_groups[0]["p_bound"] == 1.0
        ps = clone.param_groups[0]["params"]
        assert all(torch.equal(a, b) for a, b in zip(ps, net.parameters()))
        assert all(a is not b for a, b in zip(ps, net.parameters()))
        for p in ps:
            p.grad = torch.ones_like(p)
        clone.step()  # the copy works on its own tensors
    assert all(torch.equal(clone.state[q]["max_norm"], opt.state[p]["max_norm"])
               for p, q in zip(net.parameters(), clone.param_groups[0]["params"]))


def test_step_hooks():
    net, loss_fn = problem()
    opt = Fromage(net.parameters())
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kw: seen.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kw: seen.append(("post", o is opt)))
    glob = register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global", o is opt)))
    try:
        opt.step(closure_for(opt, loss_fn))
    finally:
        glob.remove()
    assert seen == [("pre", True), ("post", True), ("global", True)]
    pre.remove()
    post.remove()
    opt.step(closure_for(opt, loss_fn))
    assert len(seen) == 3


def test_state_dict_hooks():
    net, loss_fn = problem()
    opt = Fromage(net.parameters(), p_bound=1.0)
    opt.step(closure_for(opt, loss_fn))
    calls = []

    def post_sd(o, sd):
        calls.append("post_sd")
        sd["extra"] = 1
        return sd
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre_sd"))
    opt.register_state_dict_post_hook(post_sd)
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls == ["pre_sd", "post_sd"]

    def pre_load(o, sd):
        calls.append("pre_load")
        sd = dict(sd)
        sd.pop("extra")
        return sd
    opt2 = Fromage(net.parameters())
    opt2.register_load_state_dict_pre_hook(pre_load)
    opt2.register_load_state_dict_post_hook(lambda o: calls.append("post_load"))
    opt2.load_state_dict(sd)
    assert calls[-2:] == ["pre_load", "post_load"]
    assert opt2.param_groups[0]["p_bound"] == 1.0
    assert all(opt2.state[p]["max_norm"].dtype == torch.float32 for p in net.parameters())


def test_is_a_torch_optimizer():
    opt = Fromage([nn.Parameter(torch.randn(2))])
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults == {"lr": 0.01, "p_bound": None, "maximize": False, "prefactor": True,
                            "stochastic_rounding": False, "weight_decay": 0.0}
