"""Each experiment script runs in --quick mode and writes its plot and summary."""
import importlib.util
import math
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SCRIPTS = {"depth": "depth.png", "trust_breakdown": "trust_breakdown.png", "prefactor": "prefactor.png", "lr_sensitivity": "lr_sensitivity.png"}


def _load(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"fromage_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_example_quick_run_writes_files(name, tmp_path):
    results = _load(name).main(["--quick", "--out", str(tmp_path)])
    png = tmp_path / SCRIPTS[name]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = (tmp_path / "summary.txt").read_text()
    assert len(summary.splitlines()) >= 3 and "wall time" in summary
    assert results
    if name == "trust_breakdown":
        # every layer moved by exactly eta relative to itself: the distance is (1 + eta)^L - 1
        for depth, by_step in results.items():
            for _, rows in by_step.values():
                for eta, _, _, drt in rows:
                    assert drt == pytest.approx((1 + eta) ** depth - 1, rel=1e-4)
    if name == "prefactor":
        # A scale-invariant layer's gradient is orthogonal to it: each LARS step grows its norm by
        # sqrt(1 + lr^2) (up to BatchNorm's eps, which breaks exact scale invariance); Fromage keeps it.
        for (opt, lr), rec in results.items():
            want = (1 + lr * lr) ** (rec["steps"][-1] / 2) if opt == "LARS" else 1.0
            assert rec["norms"][-1] == pytest.approx([want] * len(rec["norms"][-1]), rel=1e-3)

