"""Fromage as most users run it today: a Python loop over tensors that reads norms on the host.

Written for the benchmark from the algorithm in docs/design.md, with the same per-tensor work and the
same host synchronisations as the published per-tensor implementation (a tensor compared in a
Python ``if`` and ``.item()`` for the bound), so its time is what a user switching to the fused
optimizer starts from.
"""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class LoopFromage(Optimizer):
    def __init__(self, params, lr: float = 0.01, p_bound=None):
        super().__init__(params, dict(lr=lr, p_bound=p_bound))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, bound = group["lr"], group["p_bound"]
            shrink = math.sqrt(1 + lr * lr)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state[p]
                if bound is not None and "max_norm" not in state:
                    state["max_norm"] = bound * p.norm().item()
                g_norm, p_norm = g.norm(), p.norm()
                # Each comparison of a tensor in an `if` waits for the device: two syncs per tensor.
                if p_norm > 0 and g_norm > 0:
                    p.add_(g * (p_norm / g_norm), alpha=-lr)
                else:
                    p.add_(g, alpha=-lr)
                p.div_(shrink)
                if bound is not None:
                    norm = p.norm()
                    if norm > state["max_norm"]:
                        p.mul_(state["max_norm"] / norm)
        return None
