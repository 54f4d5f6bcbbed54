"""pytest plugin for tests/test_gpu_markers.py: collect as if CUDA were present and write, for every
test, its id and whether it carries the gpu marker (to $FAKE_CUDA_COLLECT_OUT, JSON)."""
import json
import os

import pytest
import torch

torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.device_count = lambda: 1
# A CUDA build's cache key holds the visible GPUs' architectures (asked when a module lists backends).
torch.cuda.get_device_capability = lambda device=None: (9, 0)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    with open(os.environ["FAKE_CUDA_COLLECT_OUT"], "w") as f:
        json.dump([[item.nodeid, item.get_closest_marker("gpu") is not None] for item in items], f)
