"""Shared fixtures of the pytest-benchmark files: the device, and one preset's tensors at a time.

``FROMAGE_BENCH_DEVICE`` (default: cuda if present) and ``FROMAGE_BENCH_PRESETS`` (comma-separated;
default: the ``--quick`` presets of the device) choose what runs, as the CLI's options do.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not

from fromage_fused.bench import measure, presets  # noqa: E402
from fromage_fused.bench.runner import Config, _Data  # noqa: E402

DEVICE = torch.device(os.environ.get("FROMAGE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRESET_NAMES = [n for n in os.environ.get("FROMAGE_BENCH_PRESETS", "").split(",") if n] or presets.QUICK[DEVICE.type]


@pytest.fixture(scope="session")
def device():
    return DEVICE


_cache = {}


@pytest.fixture
def preset_data(request):
    """The parameter sets of the preset named by the test's ``preset`` parameter (one preset kept at a time)."""
    name = request.node.callspec.params["preset"]
    if name not in _cache:
        _cache.clear()
        shapes = presets.PRESETS[name].shapes(DEVICE)
        cfg = Config(device=DEVICE, presets=[])
        sets = measure.parameter_sets(presets.numel(shapes) * 8, measure.cache_bytes(DEVICE), limit=8)
        _cache[name] = (shapes, _Data(shapes, sets, cfg))
    return _cache[name]
