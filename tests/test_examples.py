"""Each experiment script runs in --quick mode and writes its plot and summary."""
import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = ["depth", "trust_breakdown", "prefactor", "lr_transfer"]


def _load(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"fromage_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_files(folder, name):
    png = os.path.join(folder, f"{name}.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 5000
    with open(os.path.join(folder, "summary.txt")) as f:
        summary = f.read()
    for needed in ("protocol (here | the authors')", "verdict" if name != "trust_breakdown" else "above (1+eta)^L - 1", "wall time"):
        assert needed in summary, needed
    return summary


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_quick_run_writes_files(name, tmp_path):
    results = _load(name).main(["--quick", "--out", str(tmp_path)])
    _check_files(str(tmp_path), name)
    assert results
    if name == "depth":
        assert set(results) == {"SGD", "Adam", "Fromage"}
        assert all(s is None or 0 <= s <= 1 for r in results.values() for by_lr in r.values() for s in by_lr.values())
    if name == "trust_breakdown":
        for by_epoch in results.values():
            for b in by_epoch.values():
                assert b.grad_change[0, 0].item() == 0.0 and b.loss[0].item() == pytest.approx(b.loss0.item(), rel=1e-6)
                assert b.layers[0].endswith("weight")
    if name == "prefactor":
        # A scale-invariant layer's gradient is orthogonal to it: each LARS step grows its norm by
        # sqrt(1 + lr^2) (up to BatchNorm's eps); Fromage keeps it. In float16 at lr 1, LARS overflows.
        for (opt, lr, dtype), rec in results.items():
            if dtype == "float32":
                want = (1 + lr * lr) ** (rec["steps"][-1] / 2) if opt == "LARS" else 1.0
                assert rec["norms"][-1] == pytest.approx([want] * len(rec["norms"][-1]), rel=1e-3)
        assert results[("LARS", 1.0, "float16")]["overflow"] is not None
        fromage = results[("Fromage", 1.0, "float16")]
        assert fromage["overflow"] is None and max(fromage["norms"][-1]) < 1.01
    if name == "lr_transfer":
        assert {task for task, _ in results} == {"mlp", "resnet", "transformer", "gan"}
        assert all(len(runs) == 1 for by_lr in results.values() for runs in by_lr.values())


def test_default_output_is_the_ignored_folder(tmp_path, monkeypatch):
    # Running an example as the README shows never overwrites the committed results.
    module = _load("prefactor")
    common = sys.modules["_common"]
    monkeypatch.setattr(common, "HERE", str(tmp_path))
    module.main(["--quick"])
    assert os.path.exists(tmp_path / "out" / "prefactor" / "summary.txt")
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "examples/out/" in f.read().split()


def test_shipped_text_is_there():
    text = _load("lr_transfer").shipped_text()
    assert len(text) > 20000 and "digits" in text.lower()
    assert math.isfinite(len(set(text)))


def test_depth_ablations_are_labelled(tmp_path):
    module = _load("depth")
    module.main(["--quick", "--init", "he", "--no-bias", "--out", str(tmp_path)])
    summary = (tmp_path / "summary.txt").read_text()
    assert "He-normal, zero biases (ablation)" in summary and "biases: no (ablation)" in summary
    args = type("Args", (), {"init": "he", "no_bias": True})
    assert module.name_of(args) == "depth-he-init-no-bias"
