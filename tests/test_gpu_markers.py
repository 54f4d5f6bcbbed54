"""Every test case that runs on CUDA carries the gpu marker, so that `pytest -m gpu` (what
benchmarks/gpu_check.sh runs on a GPU machine) runs all of them. Checked on any machine by
collecting the suite as if CUDA were present (tests/_fake_cuda_collect.py)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_cuda_case_is_gpu_marked(tmp_path):
    out = tmp_path / "items.json"
    env = dict(os.environ, FAKE_CUDA_COLLECT_OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "_fake_cuda_collect",
                           "-p", "no:cacheprovider", str(TESTS)],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    items = json.loads(out.read_text())
    cuda_cases = [nodeid for nodeid, _ in items if re.search(r"\[[^\]]*cuda[^\]]*\]", nodeid)]
    assert cuda_cases, "no CUDA cases collected: the fake CUDA did not take"
    unmarked = [nodeid for nodeid, gpu in items if nodeid in cuda_cases and not gpu]
    assert not unmarked, f"{len(unmarked)} CUDA cases without the gpu marker, e.g. {unmarked[:5]}"
