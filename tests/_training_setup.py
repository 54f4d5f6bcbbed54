"""A small model with every branch the training-loop tests need, built identically on demand.

Group 0: a weight with p_bound (max_norm state). Group 1: a zero-initialised bias without p_bound
(its first step takes the zero-norm fallback, the only branch that depends on the gradient's
scale). Group 2: a bf16 vector with stochastic rounding (a seed in the state).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from fromage_fused import Fromage

LR = 0.01


class Tiny(nn.Module):
    def __init__(self, device="cpu"):
        super().__init__()
        self.lin = nn.Linear(6, 5).to(device)
        nn.init.zeros_(self.lin.bias)
        self.low = nn.Parameter(torch.randn(37, device=device).to(torch.bfloat16))
        self.register_buffer("mix", torch.randn(37, device=device))

    def forward(self, x):
        return self.lin(x), (self.low.float() * self.mix).sum()


def make(device="cpu", backend="foreach", *, seed=0, lr=LR, init_seed=0):
    torch.manual_seed(init_seed)
    model = Tiny(device)
    opt = Fromage(
        [
            {"params": [model.lin.weight], "p_bound": 2.0},
            {"params": [model.lin.bias]},
            {"params": [model.low], "stochastic_rounding": True},
        ],
        lr=lr, backend=backend, seed=seed,
    )
    return model, opt


def batch(step, device="cpu"):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen).to(device), torch.randn(8, 5, generator=gen).to(device)


def loss_from(model, x, y):
    out, extra = model(x)
    return ((out - y) ** 2).mean() + 1e-3 * extra


def loss_of(model, step, device="cpu"):
    return loss_from(model, *batch(step, device))


def snapshot(model, opt):
    """Parameters and state, detached copies (state keyed by parameter name)."""
    names = {p: n for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {names[p]: {k: v.detach().clone() for k, v in s.items()} for p, s in opt.state.items() if s}
    return params, state


def assert_same(a, b, *, exact=True, tol=None):
    (pa, sa), (pb, sb) = a, b
    assert pa.keys() == pb.keys()
    for n in pa:
        if exact:
            assert torch.equal(pa[n], pb[n]), n
        else:
            atol, rtol = tol[pa[n].dtype]
            torch.testing.assert_close(pa[n], pb[n], atol=atol, rtol=rtol, msg=n)
    assert sa.keys() == sb.keys()
    for n in sa:
        assert sa[n].keys() == sb[n].keys(), n
        for k in sa[n]:
            if exact or sa[n][k].dtype == torch.int64:
                assert torch.equal(sa[n][k], sb[n][k]), (n, k)
            else:
                torch.testing.assert_close(sa[n][k], sb[n][k], atol=0, rtol=1e-6)


@contextlib.contextmanager
def one_thread():
    # The CI machine is shared: intra-op threads only oversubscribe its cores at these sizes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
