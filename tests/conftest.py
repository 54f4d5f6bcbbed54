"""The suite's shared fixtures and its one table of backend cases.

A test that takes a ``backend`` argument (and optionally ``device``) is run once per row of
:func:`backend_cases`; ``@pytest.mark.backends(...)`` narrows the rows (its keywords are those of
:func:`backend_cases`). Triton runs on a machine without CUDA under its interpreter; its kernels
are imported so when its case runs, not at collection (importing them changes what
``available_backends("cpu")`` says for every later module).
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# Tests import the installed package, never the checkout's top-level folders: kernels/ (installed as
# fromage_fused.kernels) would otherwise shadow PyPI's kernels package, which transformers imports.
# `python -m pytest` puts the working directory first on sys.path.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

CUDA = torch.cuda.is_available()
TRITON = importlib.util.find_spec("triton") is not None


def backend_cases(devices=("cpu", "cuda"), *, reference=True, interpreted=True, fused=True):
    """Rows ``(device, backend)`` of the backends that run here: on the CPU ``reference``,
    ``foreach``, ``cpu`` (the C++ kernels, when the extension can be built) and ``triton`` (under
    its interpreter: slow, small cases only); on a GPU every backend available there (those rows
    carry the ``gpu`` marker, and are skipped without one).

    ``reference=False`` leaves out the float64 oracle (the only backend that reads on the host);
    ``interpreted=False`` leaves out the interpreter; ``fused=False`` keeps only the Python backends.
    """
    from fromage_fused import available_backends
    from fromage_fused.backends import get

    rows = []
    for device in devices:
        if device == "cuda":
            names = available_backends("cuda") if CUDA else ["foreach"]
        else:
            names = available_backends("cpu")
            if TRITON and not CUDA and "triton" not in names:
                names = names + ["triton"]
        for name in names:
            if name == "reference" and not reference:
                continue
            on_interpreter = device == "cpu" and name == "triton"
            if on_interpreter and not interpreted:
                continue
            if not fused and get(name).kind not in ("reference", "foreach"):
                continue
            rows.append((device, name))
    return rows


def backend_params(rows, *, with_device=True):
    """``pytest.param``s of :func:`backend_cases` rows: ``(device, backend)``, or ``backend`` alone
    (then a GPU row's id names its device); GPU rows carry the ``gpu`` marker."""
    out = []
    for device, name in rows:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        if with_device:
            out.append(pytest.param(device, name, marks=marks, id=f"{device}-{name}"))
        else:
            out.append(pytest.param(name, marks=marks, id=name if device == "cpu" else f"{device}-{name}"))
    return out


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    if any("backend" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return  # the test chose its own
    marker = metafunc.definition.get_closest_marker("backends")
    kwargs = dict(marker.kwargs) if marker is not None else {}
    if "device" not in metafunc.fixturenames:
        kwargs.setdefault("devices", ("cpu",))
    with_device = "device" in metafunc.fixturenames
    metafunc.parametrize("device,backend" if with_device else "backend",
                         backend_params(backend_cases(**kwargs), with_device=with_device))


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(**filters): which rows of conftest.backend_cases a test runs")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not item.keywords: keywords also hold the names of the directories above
        # the test, so a checkout in a directory named "gpu" would skip every test.
        if item.get_closest_marker("gpu") is not None and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _interpreter_when_needed(request):
    # A triton case on a machine without CUDA: its kernels under the interpreter, imported now.
    callspec = getattr(request.node, "callspec", None)
    params = {} if callspec is None else callspec.params
    if params.get("backend") == "triton" and params.get("device", "cpu") == "cpu":
        from _interpreter_kernels import triton_on_cpu

        triton_on_cpu()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests choose their backends; a developer's override must not leak into them. Nor may a
    # backend the functional API resolved (and keeps) under another test's registry or loader.
    monkeypatch.delenv("FROMAGE_FUSED_BACKEND", raising=False)
    from fromage_fused import backends

    backends._resolved.clear()


@pytest.fixture
def one_thread():
    """For tests of small models: intra-op threads only add spin-waiting on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
