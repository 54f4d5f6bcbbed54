"""Messages a user reads first: they name what to change, and say nothing untrue for the machine."""
import importlib.util

import pytest
import torch

from fromage_fused import Fromage
from fromage_fused.backends import triton as triton_backend


def test_a_bad_backend_variable_is_named(monkeypatch):
    monkeypatch.setenv("FROMAGE_FUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"\$FROMAGE_FUSED_BACKEND is 'bogus'.*choose one of"):
        Fromage([torch.zeros(2, requires_grad=True)])
    monkeypatch.setenv("FROMAGE_FUSED_BACKEND", "foreach")
    assert Fromage([torch.zeros(2, requires_grad=True)]).backends() == {torch.device("cpu"): "foreach"}
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):  # named in code: the plain message
        Fromage([torch.zeros(2, requires_grad=True)], backend="bogus")


def test_triton_missing_on_a_cpu_machine_says_where_triton_runs(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    reason = triton_backend.BACKEND.unavailable_reason("cpu")
    assert "CUDA GPUs" in reason and "pip install" not in reason
    assert "pip install triton" in triton_backend.BACKEND.unavailable_reason("cuda")


def test_missing_requirement_hints_name_packages_that_install(monkeypatch, capsys):
    # The package is not on PyPI: a hint must not send the user to `pip install "fromage_fused[...]"`.
    from fromage_fused.bench import __main__ as cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a))
    assert cli.main(["--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "pip install tqdm " in err and "fromage_fused[" not in err
