"""Every backend that runs here against the float64 oracle, over many steps: the functional form on a
mixed set of shapes, and the optimizer class on a real model."""
import copy

import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage
from _oracle import compare_with_oracle
from tolerances import ORACLE_TOL

CPU_BACKENDS = [b for b in fromage_fused.available_backends("cpu") if b != "reference"]
STEPS = 20


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(ORACLE_TOL))
@pytest.mark.parametrize("p_bound", [None, 1.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_backend_matches_oracle(backend, dtype, p_bound, maximize):
    compare_with_oracle(backend, dtype, p_bound=p_bound, maximize=maximize, tol=ORACLE_TOL[dtype], steps=STEPS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p_bound", [None, 0.7])
def test_backend_matches_oracle_with_tensor_lr(backend, dtype, p_bound):
    compare_with_oracle(backend, dtype, p_bound=p_bound, tol=ORACLE_TOL[dtype], steps=STEPS, tensor_lr=True,
                        lrs=(0.02, 0.2), seed=3)


class Net(nn.Module):
    """Conv, LayerNorm, Embedding and Linear layers; a zero-initialised bias, an empty parameter, a
    frozen layer, a head used only on even steps (grad None on odd ones) and a parameter whose
    gradient is exactly zero every third step."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.LayerNorm(36)
        self.emb = nn.Embedding(10, 36)
        self.frozen = nn.Linear(36, 36)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(36, 3)
        nn.init.zeros_(self.head.bias)
        self.aux = nn.Linear(36, 3)
        self.gate = nn.Parameter(torch.randn(3))
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x, idx, step):
        h = self.norm(self.conv(x).flatten(1)) + self.emb(idx)
        h = torch.tanh(self.frozen(h))
        out = self.head(h) + self.empty.sum()
        if step % 2 == 0:
            out = out + self.aux(h)
        return out + self.gate * (0.0 if step % 3 == 0 else 1.0)


def _close(got, want, tol, what):
    atol, rtol = tol
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.detach().double(), want.detach(), rtol=0, atol=atol + rtol * scale,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p_bound", [None, 1.0])
def test_optimizer_on_a_model_matches_oracle(backend, dtype, p_bound):
    torch.manual_seed(0)
    net = Net().to(dtype)
    oracle = copy.deepcopy(net).double()
    frozen_before = copy.deepcopy(net.frozen.state_dict())
    opt = Fromage(net.parameters(), lr=0.01, p_bound=p_bound, backend=backend)
    ref = Fromage(oracle.parameters(), lr=0.01, p_bound=p_bound, backend="reference")
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        if step == STEPS // 2:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 0.05
        x = torch.randn(6, 2, 5, 5, generator=gen, dtype=dtype)
        idx = torch.randint(0, 10, (6,), generator=gen)
        opt.zero_grad(set_to_none=True)
        net(x, idx, step).square().mean().backward()
        for p, q in zip(net.parameters(), oracle.parameters()):
            q.grad = None if p.grad is None else p.grad.double()
        assert (net.aux.weight.grad is None) == (step % 2 == 1)
        opt.step()
        ref.step()
    for (name, p), q in zip(net.named_parameters(), oracle.parameters()):
        _close(p, q, ORACLE_TOL[dtype]["traj"], f"{backend} {dtype} {name}")
    assert all(torch.equal(v, net.frozen.state_dict()[k]) for k, v in frozen_before.items())
    assert not any(p in opt.state for p in net.frozen.parameters())
    if p_bound is not None:
        assert net.head.bias.abs().max().item() == 0.0  # zero-initialised, max_norm 0: stays zero
        for (name, p), q in zip(net.named_parameters(), oracle.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(opt.state[p]["max_norm"], ref.state[q]["max_norm"], rtol=1e-6, atol=1e-7)
    else:
        assert net.head.bias.abs().max().item() > 0
