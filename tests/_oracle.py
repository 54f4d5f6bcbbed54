"""The float64 oracle: a literal transcription of the Fromage contract, and a harness that runs
any backend against it.

The literal step recomputes the post-update norm directly (as the paper's reference does); the
reference backend instead derives it from the stats. Agreement of the two in float64 is itself a
test (test_reference.py).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from fromage_fused import functional
from fromage_fused.functional import UNSET_MAX_NORM


def literal_step(params, grads, max_norms, *, lr, p_bound=None, maximize=False, prefactor=True):
    """One step in place on float64 tensors, a Python ``if`` per decision; max_norms: list of floats."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if maximize:
            g = -g
        if p_bound is not None and max_norms[i] < 0:
            # max_norm is float32 state by contract: its first use already sees the stored value.
            max_norms[i] = torch.tensor(p_bound * p.norm().item(), dtype=torch.float32).item()
        p_norm, g_norm = p.norm().item(), g.norm().item()
        if p_norm > 0 and g_norm > 0:
            p.sub_(g * (lr * p_norm / g_norm))
        else:
            p.sub_(g * lr)
        if prefactor:
            p.div_(math.sqrt(1 + lr * lr))
        if p_bound is not None:
            new_norm = p.norm().item()
            if new_norm > max_norms[i]:
                p.mul_(max_norms[i] / new_norm)


#: Shapes of a small mixed model: linear, conv, embedding, LayerNorm, biases (index 3 is the
#: zero-initialised one), an empty tensor, odd sizes, and one larger than 4096 elements.
MIXED_SHAPES = [(32, 17), (17,), (8, 3, 3, 3), (8,), (50, 12), (12,), (12,), (0,), (1,), (3,), (4097,), (5, 7, 2)]
ZERO_INIT = 3


def mixed_tensors(dtype, device="cpu", seed=0, shapes=MIXED_SHAPES):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if i == ZERO_INIT:
            t.zero_()
        out.append(t.to(dtype=dtype, device=device))
    return out


def gradient_schedule(step, shapes, seed=0):
    """float64 gradients for a step: some None, some all-zero, the rest random with varied scale."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    grads: List[Optional[torch.Tensor]] = []
    for i, shape in enumerate(shapes):
        if (i + step) % 7 == 0:
            grads.append(None)
        elif (i + step) % 5 == 0:
            grads.append(torch.zeros(shape, dtype=torch.float64))
        else:
            grads.append(torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** ((i % 5) - 2))
    return grads


def run_functional(params, grads, max_norms, *, backend, lr, p_bound, maximize=False, prefactor=True, **kw):
    """Step the tensors whose gradient is not None, like the optimizer does."""
    idx = [i for i, g in enumerate(grads) if g is not None]
    functional.fromage(
        [params[i] for i in idx],
        [grads[i] for i in idx],
        None if max_norms is None else [max_norms[i] for i in idx],
        lr=lr, p_bound=p_bound, maximize=maximize, backend=backend, prefactor=prefactor, **kw,
    )


def compare_with_oracle(backend, dtype, *, device="cpu", steps=20, p_bound=None, maximize=False,
                        shapes=MIXED_SHAPES, tol, seed=0, lrs=(0.01, 0.05), tensor_lr=False):
    """Run ``backend`` on ``dtype`` tensors and the float64 reference side by side.

    Two checks each step: the trajectory (both started from the same values, both fed the same
    gradients) and the one-step error (the oracle stepped from the backend's previous values),
    which is what low precision can be held to. ``tensor_lr``: the backend gets lr as a 0-d device
    tensor (in the group's accumulation dtype) instead of a float. ``tol``: dict with ``traj`` and ``step`` entries,
    each ``(atol, rtol)``. The lr changes half-way (``lrs``). Returns the max errors seen.
    """
    params = mixed_tensors(dtype, device, seed, shapes)
    oracle = [p.detach().to("cpu", torch.float64, copy=True) for p in params]
    mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params] if p_bound is not None else None
    mn_oracle = [torch.full((), UNSET_MAX_NORM, dtype=torch.float32) for _ in params] if p_bound is not None else None
    worst = {"traj": 0.0, "step": 0.0}
    for step in range(steps):
        lr = lrs[0] if step < steps // 2 else lrs[-1]
        g64 = gradient_schedule(step, shapes, seed)
        grads = [None if g is None else g.to(dtype=dtype, device=device) for g in g64]
        g_in = [None if g is None else g.to("cpu", torch.float64) for g in grads]
        before = [p.detach().to("cpu", torch.float64, copy=True) for p in params]
        mn_before = None if mn is None else [m.detach().cpu().clone() for m in mn]
        lr_in = torch.tensor(lr, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                             device=device) if tensor_lr else lr
        run_functional(params, grads, mn, backend=backend, lr=lr_in, p_bound=p_bound, maximize=maximize)
        run_functional(oracle, g_in, mn_oracle, backend="reference", lr=lr, p_bound=p_bound, maximize=maximize)
        one = [b.clone() for b in before]
        run_functional(one, g_in, mn_before, backend="reference", lr=lr, p_bound=p_bound, maximize=maximize)
        for i, p in enumerate(params):
            got = p.detach().to("cpu", torch.float64)
            for kind, want in (("traj", oracle[i]), ("step", one[i])):
                if kind not in tol:
                    continue
                atol, rtol = tol[kind]
                err = (got - want).abs().max().item() if got.numel() else 0.0
                scale = want.abs().max().item() if want.numel() else 0.0
                worst[kind] = max(worst[kind], err / (atol + rtol * scale) if (atol + rtol * scale) else err)
                torch.testing.assert_close(
                    got, want, atol=atol + rtol * scale, rtol=0,
                    msg=lambda m: f"{backend} {dtype} step {step} tensor {i} shape {tuple(p.shape)} ({kind}): {m}",
                )
        if mn is not None:
            got_mn = torch.stack([m.cpu() for m in mn]).double()
            want_mn = torch.stack(mn_oracle).double()
            torch.testing.assert_close(got_mn, want_mn, atol=1e-6, rtol=tol.get("max_norm", 1e-5))
    return worst
