"""Every backend that runs here against the float64 oracle, over many steps: the functional form on a
mixed set of shapes, non-contiguous tensors, and the optimizer class on a real model."""
import copy

import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage
from fromage_fused.functional import UNSET_MAX_NORM
from _oracle import compare_with_oracle
from tolerances import ORACLE_TOL

STEPS = 20


@pytest.mark.backends(reference=False)
@pytest.mark.parametrize("dtype", list(ORACLE_TOL))
@pytest.mark.parametrize("p_bound", [None, 1.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_backend_matches_oracle(backend, dtype, p_bound, maximize):
    compare_with_oracle(backend, dtype, p_bound=p_bound, maximize=maximize, tol=ORACLE_TOL[dtype], steps=STEPS)


@pytest.mark.backends(reference=False)
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


@pytest.mark.usefixtures("one_thread")
@pytest.mark.backends(reference=False)
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
    assert not any(float(opt.state[p].get("max_norm", UNSET_MAX_NORM)) >= 0 for p in net.frozen.parameters())
    if p_bound is not None:
        assert net.head.bias.abs().max().item() == 0.0  # zero-initialised, max_norm 0: stays zero
        for (name, p), q in zip(net.named_parameters(), oracle.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(opt.state[p]["max_norm"], ref.state[q]["max_norm"], rtol=1e-6, atol=1e-7)
    else:
        assert net.head.bias.abs().max().item() > 0


def _strided(dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return [r(6, 9).to(dtype).t(),                                      # transposed
            r(7, 10).to(dtype)[:, ::3],                                 # strided slice
            r(2, 3, 4, 5).to(dtype).to(memory_format=torch.channels_last),
            torch.complex(r(5, 4), r(5, 4)).to(cdtype).t()]             # complex, transposed


@pytest.mark.backends(reference=False)
@pytest.mark.parametrize("dtype", list(ORACLE_TOL))
@pytest.mark.parametrize("p_bound", [None, 0.9])
def test_non_contiguous_tensors_match_oracle(backend, dtype, p_bound):
    params, grads = _strided(dtype, 0), _strided(dtype, 1)
    grads[0] = grads[0].contiguous()  # a gradient laid out unlike its parameter
    oracle = [p.to(torch.complex128 if p.is_complex() else torch.float64) for p in params]
    mn = [torch.full((), UNSET_MAX_NORM) for _ in params]
    mn_oracle = [m.clone() for m in mn]
    for step in range(3):
        g64 = [g.to(o.dtype) for g, o in zip(grads, oracle)]
        fromage_fused.functional.fromage(params, grads, mn if p_bound else None, lr=0.05, p_bound=p_bound,
                                         backend=backend)
        fromage_fused.functional.fromage(oracle, g64, mn_oracle if p_bound else None, lr=0.05, p_bound=p_bound,
                                         backend="reference")
    tol = ORACLE_TOL[dtype].get("traj", ORACLE_TOL[dtype]["step"])
    for i, (p, o) in enumerate(zip(params, oracle)):
        assert not p.is_contiguous()
        p_, o_ = (torch.view_as_real(p), torch.view_as_real(o)) if p.is_complex() else (p, o)
        atol, rtol = tol
        scale = o_.abs().max().item()
        slack = 3 if "traj" not in ORACLE_TOL[dtype] else 1  # low precision: a rounding per step
        torch.testing.assert_close(p_.double(), o_, rtol=0, atol=slack * (atol + rtol * scale),
                                   msg=lambda m: f"tensor {i}: {m}")
