"""A real training run on scikit-learn's digits, and the main job as a subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fromage_fused import Fromage
from fromage_fused import demo

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("lr, p_bound", [(0.03, None), (0.1, 2.0)])
def test_digits_mlp_learns(lr, p_bound):
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = demo.load_digits()
    model = demo.mlp()
    opt = Fromage(model.parameters(), lr=lr, p_bound=p_bound)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        first = loss_fn(model(xtr), ytr).item()
    for _ in range(5):
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    with torch.no_grad():
        last = loss_fn(model(xtr), ytr).item()
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert last < 0.2 * first
    assert acc > 0.85, acc  # chance is 0.1


def test_demo_main_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "fromage_fused.demo", "--epochs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep
             + os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 1 and "test accuracy" in lines[0]
    acc = float(lines[0].split("test accuracy")[1].split()[0])
    assert acc > 0.5, proc.stdout
