import os
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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not item.keywords: keywords also hold the names of the directories above
        # the test, so a checkout in a directory named "gpu" would skip every test.
        if item.get_closest_marker("gpu") is not None and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # Tests choose their backends; a developer's override must not leak into them. Nor may a
    # backend the functional API resolved (and keeps) under another test's registry or loader.
    monkeypatch.delenv("FROMAGE_FUSED_BACKEND", raising=False)
    from fromage_fused import functional

    functional._resolved.clear()


@pytest.fixture
def one_thread():
    """For tests of small models: intra-op threads only add spin-waiting on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
