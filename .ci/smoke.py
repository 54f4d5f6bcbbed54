"""Use an installed fromage_fused as a new user would, from outside any checkout: import, the cpu
backend (built on first use, or prebuilt), a few steps equal to the reference backend's, a
state_dict round trip, and LARS and LAMB on the cpu backend against the reference.
``SMOKE_EXPECT_LOAD=prebuilt`` (or ``jit-cpu``) says how the C++ extension must have been loaded."""
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage, available_backends, backend_report
from fromage_fused.backends import native


def check(ok, what):
    if not ok:
        sys.exit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}")


def train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = torch.randint(0, 4, (32,), generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def main():
    here = Path(fromage_fused.__file__).resolve()
    check("site-packages" in here.parts, f"fromage_fused {fromage_fused.__version__} imported from {here.parent}")
    print(f"smoke: torch {torch.__version__}; backend_report: {backend_report('cpu')}")
    check("cpu" in available_backends("cpu"), f"available_backends('cpu') = {available_backends('cpu')}")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    twin = copy.deepcopy(model)
    start = time.perf_counter()
    opt = Fromage(model.parameters(), lr=0.01, p_bound=1.0, backend="cpu")
    print(f"smoke: Fromage(backend='cpu') ready in {time.perf_counter() - start:.1f} s")
    ref = Fromage(twin.parameters(), lr=0.01, p_bound=1.0, backend="reference")
    check(opt.backends() == {torch.device("cpu"): "cpu"}, f"opt.backends() = {opt.backends()}")
    expected = os.environ.get("SMOKE_EXPECT_LOAD")
    if expected:
        check(native.load() == expected, f"the C++ extension was loaded as {native.load()!r} (expected {expected!r})")
    train(model, opt, 5, seed=1)
    train(twin, ref, 5, seed=1)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    check(True, "5 steps on cpu equal the reference backend's")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        saved = torch.load(path, weights_only=True)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved["model"])
    opt2 = Fromage(resumed.parameters(), lr=0.5, backend="cpu")
    opt2.load_state_dict(saved["opt"])
    check(opt2.param_groups[0]["lr"] == 0.01 and opt2.param_groups[0]["p_bound"] == 1.0, "hyper-parameters restored")
    train(model, opt, 3, seed=2)
    train(resumed, opt2, 3, seed=2)
    check(all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters())),
          "state_dict round trip: the resumed run continues exactly")

    # The family: LARS and LAMB run on the installed kernels (their rule headers and Triton helpers
    # ship with the package) and follow the reference backend.
    for cls, options in ((fromage_fused.LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2)),
                         (fromage_fused.LAMB, dict(lr=0.01, weight_decay=0.01, caution=True))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        twin = copy.deepcopy(model)
        opt = cls(model.parameters(), backend="cpu", **options)
        ref = cls(twin.parameters(), backend="reference", **options)
        train(model, opt, 5, seed=3)
        train(twin, ref, 5, seed=3)
        check(opt.backends() == {torch.device("cpu"): "cpu"}, f"{cls.__name__} steps on the cpu backend")
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        check(True, f"5 {cls.__name__} steps on cpu equal the reference backend's")
    print("smoke: passed")


if __name__ == "__main__":
    main()
