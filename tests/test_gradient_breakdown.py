"""gradient_breakdown (Figure 1's probe) against a direct float64 computation."""
import copy
import math

import pytest
import torch

from fromage_fused import deep_relative_trust, gradient_breakdown
from fromage_fused.trust import Breakdown

ETAS = [0.0, 0.003, 0.01, 0.05, 0.1]


def _net(dtype=torch.float32, seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 9), torch.nn.Tanh()]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(9))
    layers += [torch.nn.Linear(9, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4)]
    return torch.nn.Sequential(*layers).to(dtype)


def _data(dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(40, 6, generator=gen).to(dtype), torch.randint(0, 4, (40,), generator=gen)


def _direct(net, x, y, etas):
    """The definition, written out in float64 on a copy of the network."""
    net = _net_copy(net)
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]

    def loss_grads():
        loss = torch.nn.functional.cross_entropy(net(x.double()), y)
        return loss.item(), [g.detach() for g in torch.autograd.grad(loss, params)]

    loss0, g0 = loss_grads()
    losses, changes = [], []
    for eta in etas:
        with torch.no_grad():
            for p, w, g in zip(params, w0, g0):
                p.copy_(w - eta * w.norm() / g.norm() * g)
        loss, g = loss_grads()
        losses.append(loss)
        changes.append([((b - a).norm() / a.norm()).item() for a, b in zip(g0, g)])
    return loss0, losses, changes


def _net_copy(net):
    return copy.deepcopy(net).double()


# float32: the loss to a few ulps; a gradient change is a difference of two gradients, so it loses
# about |g| / |g' - g| of relative accuracy (up to ~1e2 at eta 0.003 here).
@pytest.mark.parametrize("dtype, rtol, change_rtol", [(torch.float64, 1e-10, 1e-8), (torch.float32, 1e-6, 1e-4)])
def test_matches_direct_float64(dtype, rtol, change_rtol):
    net, (x, y) = _net(dtype), _data(dtype)
    got = gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, ETAS)
    loss0, losses, changes = _direct(net, x, y, ETAS)
    assert isinstance(got, Breakdown)
    assert got.layers == [n for n, _ in net.named_parameters()]
    assert got.grad_change.shape == (len(ETAS), 6) and got.loss.shape == (len(ETAS),)
    assert got.loss0.item() == pytest.approx(loss0, rel=rtol)
    torch.testing.assert_close(got.loss.double(), torch.tensor(losses, dtype=torch.float64), rtol=rtol, atol=0)
    # At eta = 0 the gradient change is exactly 0; elsewhere compare relatively.
    assert got.grad_change[0].abs().max().item() == 0.0
    torch.testing.assert_close(got.grad_change[1:].double(), torch.tensor(changes[1:], dtype=torch.float64),
                               rtol=change_rtol, atol=0)
    assert got.etas.tolist() == ETAS


def test_every_tensor_moves_by_eta_so_trust_is_the_compound():
    # Deep relative trust of the probe's perturbation is (1 + eta)^L - 1 by construction: every
    # tensor moves by exactly eta relative to itself. A unit test of the probe, not a finding.
    net, (x, y) = _net(torch.float64), _data(torch.float64)
    before = [p.detach().clone() for p in net.parameters()]
    seen = []

    def loss_fn(out, target):
        seen.append((deep_relative_trust(before, net, matrices_only=True).item(),
                     deep_relative_trust(before, net).item()))
        return torch.nn.functional.cross_entropy(out, target)

    got = gradient_breakdown(net, loss_fn, x, y, ETAS)
    assert got.moved.item() == 6 and got.moved.dim() == 0
    assert len(seen) == len(ETAS) + 1
    for eta, (matrices, everything) in zip(ETAS, seen[1:]):
        assert matrices == pytest.approx((1 + eta) ** 3 - 1, rel=1e-12, abs=1e-15)
        assert everything == pytest.approx((1 + eta) ** 6 - 1, rel=1e-12, abs=1e-15)


def test_model_is_restored_and_grads_untouched():
    net, (x, y) = _net(batchnorm=True), _data()
    net[0].weight.grad = torch.full_like(net[0].weight, 3.0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, ETAS)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(net[0].weight.grad, torch.full_like(net[0].weight, 3.0))
    assert net[3].weight.grad is None

    def boom(out, target):
        if not torch.equal(net[0].weight, state["0.weight"]):
            raise RuntimeError("boom")
        return torch.nn.functional.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="boom"):
        gradient_breakdown(net, boom, x, y, [0.1])
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_layers_by_name_or_tensor():
    net, (x, y) = _net(), _data()
    every = gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, ETAS)
    by_name = gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, ETAS, layers=["2.weight", "0.weight"])
    by_tensor = gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, ETAS,
                                   layers=[net[2].weight, net[0].weight])
    assert by_name.layers == by_tensor.layers == ["2.weight", "0.weight"]
    torch.testing.assert_close(by_name.grad_change, every.grad_change[:, [2, 0]])
    torch.testing.assert_close(by_tensor.grad_change, by_name.grad_change)
    with pytest.raises(ValueError, match="'nope' is not a trainable parameter"):
        gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, ETAS, layers=["nope"])
    with pytest.raises(ValueError, match="not a trainable parameter"):
        gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, ETAS, layers=[torch.zeros(9, 6)])


def test_zero_tensors_and_unused_parameters_stay():
    net, (x, y) = _net(), _data()
    with torch.no_grad():
        net[2].bias.zero_()
    net.unused = torch.nn.Parameter(torch.ones(3))
    seen = []

    def loss_fn(out, target):
        seen.append((net[2].bias.detach().clone(), net.unused.detach().clone()))
        return torch.nn.functional.cross_entropy(out, target)

    got = gradient_breakdown(net, loss_fn, x, y, [0.1], layers=["2.bias", "unused"])
    assert got.moved.item() == 5  # of 7 trainable tensors: not the zero bias, not the unused one
    for bias, unused in seen:
        assert torch.equal(bias, torch.zeros(9)) and torch.equal(unused, torch.ones(3))
    assert got.grad_change[0, 1].item() == 0.0  # an unused parameter's gradient is zero and stays zero
    assert math.isfinite(got.grad_change[0, 0].item())


@pytest.mark.parametrize("etas", [[], [math.nan], [0.1, math.inf]])
def test_bad_etas(etas):
    net, (x, y) = _net(), _data()
    with pytest.raises(ValueError, match="etas"):
        gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, etas)


def test_loss_must_be_a_scalar():
    net, (x, y) = _net(), _data()
    with pytest.raises(ValueError, match="0-d tensor"):
        gradient_breakdown(net, lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none"), x, y, [0.1])
