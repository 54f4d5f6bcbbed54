"""What the LARS and LAMB rule tests share: the small models they train (a convnet with batch norms
and an MLP with zero-initialised tensors), their batches and gradients (with None and zero ones on
a schedule), the comparison with a per-tensor bound, and the dtype each backend is tested in."""
import torch
import torch.nn.functional as F
from torch import nn

from _param_split import schedule
from tolerances import ORACLE_TOL, SR_STEP_TOL


def _convnet():
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10),
    )


def _mlp():
    model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))
    nn.init.zeros_(model[4].weight)  # ‖p‖ = 0 at first: ratio 1
    nn.init.zeros_(model[2].bias)
    return model


MODELS = {"mlp": _mlp, "convnet": _convnet}


def make_model(name, dtype):
    torch.manual_seed(1)
    return MODELS[name]().to(dtype)


def batch(step, dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(32, 64, generator=gen).to(dtype), torch.randint(0, 10, (32,), generator=gen)


def gradients(model, ours, step, dtype):
    """The gradients of step ``step`` of ``model`` (its parameters split into the two groups ``ours``),
    set as the parameters' ``.grad`` after the schedule's None and zero gradients; float64 copies
    for the oracle."""
    model.zero_grad(set_to_none=True)
    x, y = batch(step, dtype)
    F.cross_entropy(model(x).float(), y).backward()
    flat = ours[0] + ours[1]
    grads = schedule([p.grad for p in flat], step, [0] * len(ours[0]) + [1] * len(ours[1]))
    for p, g in zip(flat, grads):
        p.grad = g
    return [None if g is None else g.double().clone() for g in grads]


def hand(groups, grads, n0):
    """Give the oracle's two groups their gradients (the first ``n0`` are group 0's)."""
    groups[0]["grads"], groups[1]["grads"] = grads[:n0], grads[n0:]


def close(got, want, tol, what):
    """``got`` within ``tol`` = (atol, rtol) of ``want``, rtol relative to its largest magnitude."""
    atol, rtol = tol
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.detach().double(), want.double(), rtol=0, atol=atol + rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def dtype_and_tol(backend):
    """float64 where the backend takes it (the Python ones), else float32 (the kernels'), with the
    oracle's trajectory tolerance of that dtype."""
    if backend in ("reference", "foreach"):
        return torch.float64, ORACLE_TOL[torch.float64]["traj"]
    return torch.float32, ORACLE_TOL[torch.float32]["traj"]


def assert_rounds_stochastically(run):
    """``run(seed, rounding=True)`` steps bf16 parameters once and returns them and the exact float64
    result: within one ulp of it, the same for the same seed, different for another seed and
    without rounding."""
    got, exact = run(7)
    again, _ = run(7)
    other, _ = run(8)
    nearest, _ = run(7, rounding=False)
    for p, q in zip(got, exact):
        close(p, q, SR_STEP_TOL, "one ulp of the exact value")
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    assert any(not torch.equal(a, b) for a, b in zip(got, other))
    assert any(not torch.equal(a, b) for a, b in zip(got, nearest))
