"""Fromage(prefactor=False), the paper's LARS baseline, against the float64 literal loop."""
import copy
import math

import pytest
import torch

from fromage_fused import Fromage
from _oracle import MIXED_SHAPES, gradient_schedule, literal_step, mixed_tensors
from tolerances import ORACLE_TOL

STEPS = 30


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p_bound", [None, 1.5])
def test_no_prefactor_matches_literal_loop(backend, dtype, p_bound):
    params = [torch.nn.Parameter(t) for t in mixed_tensors(dtype, seed=5)]
    oracle = [p.detach().double().clone() for p in params]
    max_norms = [-1.0] * len(params)
    opt = Fromage(params, lr=0.05, p_bound=p_bound, prefactor=False, backend=backend)
    atol, rtol = ORACLE_TOL[dtype]["traj"]
    for step in range(STEPS):
        g64 = gradient_schedule(step, MIXED_SHAPES, seed=5)
        for p, g in zip(params, g64):
            p.grad = None if g is None else g.to(dtype)
        opt.step()
        literal_step(oracle, [None if g is None else g.to(dtype).double() for g in g64], max_norms,
                     lr=0.05, p_bound=p_bound, prefactor=False)
        for i, (p, want) in enumerate(zip(params, oracle)):
            scale = want.abs().max().item() if want.numel() else 0.0
            torch.testing.assert_close(p.detach().double(), want, atol=atol + rtol * scale, rtol=0,
                                       msg=lambda m: f"step {step} tensor {i}: {m}")


def test_without_prefactor_norms_grow_with_it_they_do_not():
    # A gradient orthogonal to the weights (as in a scale-invariant layer): LARS grows the norm by
    # sqrt(1 + lr^2) per step, Fromage keeps it.
    lr, steps = 0.1, 20
    w = {flag: torch.nn.Parameter(torch.tensor([1.0, 0.0], dtype=torch.float64)) for flag in (True, False)}
    opts = {flag: Fromage([w[flag]], lr=lr, prefactor=flag) for flag in w}
    for _ in range(steps):
        for flag, p in w.items():
            p.grad = torch.stack([-p[1], p[0]]).detach()  # orthogonal to p
            opts[flag].step()
    assert w[True].norm().item() == pytest.approx(1.0, rel=1e-12)
    assert w[False].norm().item() == pytest.approx((1 + lr * lr) ** (steps / 2), rel=1e-12)


def test_prefactor_is_saved_and_old_state_dicts_load():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Fromage([p], lr=0.02, prefactor=False)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["prefactor"] is False
    fresh = Fromage([p], lr=0.02)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["prefactor"] is False
    old = copy.deepcopy(sd)
    del old["param_groups"][0]["prefactor"]  # saved before the option existed: the constructor's value
    fresh = Fromage([p], lr=0.02)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["prefactor"] is True
    p.grad = torch.randn(4, 3)
    before = p.detach().clone()
    fresh.step()
    g = p.grad
    want = (before - 0.02 * before.norm() / g.norm() * g) / math.sqrt(1 + 0.02 ** 2)
    torch.testing.assert_close(p.detach(), want)
