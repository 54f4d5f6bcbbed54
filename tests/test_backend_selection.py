"""Which backend runs: the registry's order, auto, the environment override, and fallbacks."""
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage, functional
from fromage_fused import backends as registry
from fromage_fused.backends import Backend, BackendUnavailable
from fromage_fused.backends.foreach import ForeachBackend


def test_available_backends_order():
    names = fromage_fused.available_backends("cpu")
    assert names == fromage_fused.available_backends()  # cpu is the default
    assert {"reference", "foreach"} <= set(names) <= set(fromage_fused.backend_names())
    cpu = torch.device("cpu")
    ranks = [registry.get(n).priority_on(cpu) for n in names]
    assert ranks == sorted(ranks, reverse=True)
    assert names[-1] == "reference"  # the oracle is never the fast choice
    assert names.index("foreach") < names.index("reference")
    assert registry.resolve("auto", "cpu").name == names[0]


def test_every_known_backend_is_a_backend_with_a_unique_name():
    names = fromage_fused.backend_names()
    assert len(set(names)) == len(names)
    for name in names:
        b = registry.get(name)
        assert isinstance(b, Backend) and b.name == name
        assert b.syncs == (name == "reference")


def _planned(opt):
    return {g.backend.name for group in opt.param_groups
            for g in functional.plan(group["params"], [torch.zeros_like(p) for p in group["params"]], None,
                                     backend=opt.backend)}


def test_env_override_of_auto(monkeypatch):
    p = nn.Parameter(torch.randn(3))
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    opt = Fromage([p])
    assert opt.backend == "reference" and _planned(opt) == {"reference"}
    assert registry.resolve("auto", "cpu").name == "reference"
    # a backend named in code wins over the environment
    assert Fromage([p], backend="foreach").backend == "foreach"
    monkeypatch.setenv(registry.ENV_VAR, "  ")
    assert Fromage([p]).backend == "auto"
    monkeypatch.setenv(registry.ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend.*foreach"):
        Fromage([p])


def test_without_override_auto_plans_the_first_available():
    opt = Fromage([nn.Parameter(torch.randn(3))])
    assert opt.backend == "auto" and _planned(opt) == {fromage_fused.available_backends("cpu")[0]}


class _Broken(ForeachBackend):
    """Claims the top rank but fails to load, like a native build that did not compile."""
    name = "broken-test"
    priority = 10_000
    calls = 0

    def unavailable_reason(self, device):
        type(self).calls += 1
        raise BackendUnavailable("the extension failed to build: missing compiler")


@pytest.fixture
def broken(monkeypatch):
    b = _Broken()
    monkeypatch.setitem(registry._registry(), b.name, b)
    monkeypatch.setattr(registry, "_warned", set())
    return b


def test_auto_falls_back_from_a_broken_backend_with_one_warning(broken):
    assert "broken-test" not in fromage_fused.available_backends("cpu")
    p = nn.Parameter(torch.randn(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = Fromage([p], lr=0.1)  # auto is resolved per device at construction
        for _ in range(3):
            p.grad = torch.randn(4)
            before = p.detach().clone()
            opt.step()
            assert not torch.equal(before, p.detach())
    mine = [w for w in caught if "broken-test" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert issubclass(mine[0].category, RuntimeWarning)
    assert "missing compiler" in str(mine[0].message) and "falling back" in str(mine[0].message)
    assert registry.resolve("auto", "cpu").name != "broken-test"


def test_named_broken_backend_raises_with_the_reason(broken):
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(RuntimeError, match="broken-test.*missing compiler"):
        Fromage([p], backend="broken-test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named: an error, never a warning
        with pytest.raises(RuntimeError, match="missing compiler"):
            functional.fromage([torch.randn(2)], [torch.randn(2)], None, lr=0.01, backend="broken-test")


def test_env_override_naming_a_broken_backend_raises(broken, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "broken-test")
    with pytest.raises(RuntimeError, match="missing compiler"):
        Fromage([nn.Parameter(torch.randn(4))])


def test_a_backend_module_that_fails_to_import_is_unavailable_with_its_reason(monkeypatch, tmp_path):
    (tmp_path / "needs_a_missing_module.py").write_text("import fromage_no_such_dependency\n")
    monkeypatch.setattr(registry, "__path__", list(registry.__path__) + [str(tmp_path)])
    registry._registry.cache_clear()
    try:
        names = fromage_fused.backend_names()
        assert "needs_a_missing_module" in names and names[-1] == "needs_a_missing_module"
        report = fromage_fused.backend_report("cpu")
        assert "fromage_no_such_dependency" in report["needs_a_missing_module"]
        assert "needs_a_missing_module" not in fromage_fused.available_backends("cpu")
        p = nn.Parameter(torch.randn(4))
        p.grad = torch.randn(4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a missing optional dependency is no failed load
            Fromage([p], lr=0.1).step()
        with pytest.raises(RuntimeError, match="needs_a_missing_module.*fromage_no_such_dependency"):
            Fromage([p], backend="needs_a_missing_module")
    finally:
        monkeypatch.undo()
        registry._registry.cache_clear()
    assert "needs_a_missing_module" not in fromage_fused.backend_names()


def test_without_numpy_the_package_still_steps_on_every_other_backend():
    """The CPU torch wheel brings no numpy; only a backend that needs it may go."""
    code = """
import sys
sys.modules["numpy"] = None
import torch
import fromage_fused
from fromage_fused import Fromage
p = torch.nn.Parameter(torch.randn(5))
p.grad = torch.randn(5)
for name in ["auto"] + [b for b in fromage_fused.available_backends("cpu")]:
    Fromage([p], lr=0.1, backend=name).step()
print(sorted(fromage_fused.backend_report("cpu")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"foreach", "reference", "triton"} <= set(eval(done.stdout.strip().splitlines()[-1]))


def test_opt_backends_names_the_backend_of_each_device():
    p = nn.Parameter(torch.randn(3))
    assert Fromage([p]).backends() == {torch.device("cpu"): registry.resolve("auto", "cpu").name}
    assert Fromage([p], backend="reference").backends() == {torch.device("cpu"): "reference"}
    two = Fromage([{"params": [p]}, {"params": [nn.Parameter(torch.randn(2))]}], backend="foreach")
    assert two.backends() == {torch.device("cpu"): "foreach"}


def test_backend_report_covers_every_backend_and_agrees_with_available_backends():
    for device in ("cpu", "cuda"):
        report = fromage_fused.backend_report(device)
        assert set(report) == set(fromage_fused.backend_names())
        usable = [name for name, says in report.items() if says.startswith("available")]
        assert usable == fromage_fused.available_backends(device)
        assert all(isinstance(says, str) and says for says in report.values())
