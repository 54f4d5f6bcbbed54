"""A tensor lr edited after construction is never read on the host during a step: one that is
negative, NaN or infinite (in float32) makes the step skip, as found_inf does. Every parameter and
its state (max_norm, set or unset, and the stochastic-rounding seed) stay as they were, and the
steps after the lr is usable again are those of a run that never had the bad step."""
import copy
import math

import pytest
import torch
from torch import nn

import _triton_interpreter  # noqa: F401  (triton among the backends on a machine without CUDA)
import fromage_fused
from fromage_fused import Fromage

BACKENDS = fromage_fused.available_backends("cpu")
BAD = [math.nan, -0.5, math.inf, -math.inf, 1e39]


def _model(backend, found_inf):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(33).to(torch.bfloat16)),
              nn.Parameter(torch.randn(6, dtype=torch.complex64)), nn.Parameter(torch.randn(7, dtype=torch.float64)),
              nn.Parameter(torch.randn(9))]
    lr = torch.tensor(0.05, dtype=torch.float64)
    opt = Fromage([{"params": params[:4], "p_bound": 1.1, "stochastic_rounding": True},
                   {"params": params[4:], "maximize": True}], lr=lr, backend=backend, seed=2)
    if found_inf:
        opt.found_inf = torch.tensor(0.0)  # (set again before each step, as GradScaler does)
    return params, opt, lr


def _step(params, opt, seed, found_inf):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (-4 * p.detach().to(torch.complex128 if p.is_complex() else torch.float64)
                  + torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype)
    if seed == 0:
        params[3].grad = None  # its max_norm stays unset until the bad step, and after it
    if found_inf:
        opt.found_inf = torch.tensor(0.0)
    opt.step()


def _state(params, opt):
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if opt.state.get(p)})


def _equal(a, b):
    (pa, sa), (pb, sb) = a, b
    return (all(torch.equal(x, y) for x, y in zip(pa, pb)) and sa.keys() == sb.keys()
            and all(sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]) for i in sa))


@pytest.mark.parametrize("found_inf", [False, True])
@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unusable_tensor_lr_skips_the_step(backend, bad, found_inf):
    params, opt, lr = _model(backend, found_inf)
    _step(params, opt, 0, found_inf)
    twin_params, twin_opt = copy.deepcopy((params, opt))
    twin_lr = twin_opt.param_groups[0]["lr"]
    before = _state(params, opt)
    assert float(before[1][0]["max_norm"]) > 0 and float(before[1][3]["max_norm"]) == -1
    lr.fill_(bad)  # the same tensor in both groups
    _step(params, opt, 1, found_inf)
    assert _equal(_state(params, opt), before)
    lr.fill_(0.05)
    for seed in (2, 3):  # as if the bad step had never been taken
        _step(params, opt, seed, found_inf)
        _step(twin_params, twin_opt, seed, found_inf)
    assert twin_lr is twin_opt.param_groups[1]["lr"]
    assert _equal(_state(params, opt), _state(twin_params, twin_opt))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_monitor_reports_a_skipped_step(backend):
    params, opt, lr = _model(backend, False)
    opt.monitor = True
    lr.fill_(-0.5)
    _step(params, opt, 0, False)
    assert all(float(s.relative_change.abs().max()) == 0 and not s.clamped.any() for s in opt.last_stats())
