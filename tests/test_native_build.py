"""Loading the C++ extension: fallback and errors when it cannot be built, torch.compile over its
ops (fake implementations), and an install that needs no compiler."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fromage_fused import backends, functional
from fromage_fused.backends import native
from _native import require_native

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def broken_build(monkeypatch):
    """A fresh loader whose build fails, as without a compiler."""
    monkeypatch.setattr(native, "_state", {"loaded": None, "error": None, "cuda_error": None})
    monkeypatch.setattr(backends, "_warned", set())

    def fail():
        raise backends.BackendUnavailable("the C++ extension could not be built: no compiler (simulated)")

    monkeypatch.setattr(native, "_load_once", fail)
    monkeypatch.delenv(native.REQUIRE_ENV, raising=False)


def test_auto_falls_back_with_one_warning_when_the_build_fails(broken_build):
    with pytest.warns(RuntimeWarning, match="'cpu' failed to load.*no compiler"):
        chosen = backends.resolve("auto", "cpu")
    assert chosen.name == "foreach"
    p, g = torch.randn(5), torch.randn(5)
    functional.fromage([p], [g], None, lr=0.1)  # still steps, through the fallback


def test_named_backend_raises_with_the_reason_when_the_build_fails(broken_build):
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run on cpu.*no compiler"):
        backends.check("cpu", "cpu")


def test_required_extension_turns_a_failed_build_into_an_error(broken_build, monkeypatch):
    monkeypatch.setenv(native.REQUIRE_ENV, "1")
    with pytest.raises(RuntimeError, match=native.REQUIRE_ENV):
        backends.resolve("auto", "cpu")


def test_backends_decline_the_other_device_type_without_building():
    assert "cpu tensors only" in backends.get("cpu").unavailable_reason(torch.device("cuda", 0))
    assert "cuda tensors only" in backends.get("cuda").unavailable_reason(torch.device("cpu"))
    assert backends.get("cpu").priority_on(torch.device("cpu")) > backends.get("foreach").priority_on(torch.device("cpu"))


def test_plain_setup_needs_neither_torch_nor_a_compiler():
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; exec(open('setup.py').read())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("fromage_fused")


def test_torch_compile_traces_the_ops_through_their_fake_implementations():
    require_native()
    params = [torch.randn(33, 7), torch.randn(4100)]
    grads = [torch.randn_like(p) for p in params]
    max_norms = [torch.full((), -1.0) for _ in params]

    def step(ps, gs, mns, lr):
        stats = torch.ops.fromage_fused.stats(ps, gs, True)
        torch.ops.fromage_fused.apply_(ps, gs, stats, lr, mns, 1.0, False, True, None, None, None)

    eager_p, eager_m = [p.clone() for p in params], [m.clone() for m in max_norms]
    step(eager_p, grads, eager_m, torch.tensor(0.05))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(params, grads, max_norms, torch.tensor(0.05))
    assert all(torch.equal(a, b) for a, b in zip(params, eager_p))
    assert all(torch.equal(a, b) for a, b in zip(max_norms, eager_m))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fp = [mode.from_tensor(p) for p in params]
        out = torch.ops.fromage_fused.stats(fp, fp, True)
        assert out.shape == (2, 3) and out.dtype == torch.float32


def test_missing_sources_give_a_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {"loaded": None, "error": None, "cuda_error": None})
    monkeypatch.setattr(native, "CSRC", tmp_path)
    real_find_spec = native.importlib.util.find_spec
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda name, *a: None if name == "fromage_fused._C" else real_find_spec(name, *a))
    monkeypatch.delenv(native.REQUIRE_ENV, raising=False)
    with pytest.raises(backends.BackendUnavailable, match="sources not found"):
        native.load()
