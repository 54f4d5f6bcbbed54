"""benchmarks/gpu_check.sh, the one call a GPU machine makes, rehearsed on the CPU: it runs end to
end, its summary survives a stage cut off by its limit, it clears a build lock a killed build
left behind, and its helpers (per-test time limit, goal evaluation) do what they say."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_goals  # noqa: E402


def _run_check(out, timeout=400, **env):
    full = dict(os.environ, GPU_CHECK_REHEARSAL="1", OUT=str(out), PYTHON=sys.executable, SKIP_INSTALL="1", **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def _stage(summary, name):
    line = next((ln for ln in summary.splitlines() if ln.split()[:1] == [name]), None)
    assert line is not None, f"no {name} line in:\n{summary}"
    return line.split()


def test_rehearsal_runs_end_to_end(tmp_path):
    out = tmp_path / "out"
    done = _run_check(out, RESULTS_DIR=str(tmp_path / "results"))
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stdout[-3000:] + done.stderr[-2000:]
    for stage in ("build", "tests", "bench"):
        assert _stage(summary, stage)[1] == "ok"
    assert "done, exit 0" in summary.splitlines()[0]
    assert "tests:" in summary and " in " in summary.split("tests:")[-1].splitlines()[0]  # pytest's summary line
    assert "GPU goals" in summary and "goals:" in summary
    name = next(p.stem for p in out.glob("rehearsal-*.json"))
    rows = json.loads((tmp_path / "results" / f"{name}.json").read_text())["rows"]
    assert rows and all(r["device"] == "cpu" and r["torch"] and r["date"] for r in rows)
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8  # what a device call brings back
    assert (out / "setup.log").is_file() and (out / "tests.log").is_file()


def test_a_stage_cut_off_by_its_limit_still_reports(tmp_path):
    # pytest stopped by SIGINT (not SIGTERM) still prints its summary line, which lands in summary.txt.
    slow = tmp_path / "slow" / "test_slow.py"
    slow.parent.mkdir()
    slow.write_text(textwrap.dedent("""
        import time, pytest

        @pytest.mark.gpu
        def test_quick():
            pass

        @pytest.mark.gpu
        def test_slow():
            time.sleep(120)
    """))
    out = tmp_path / "out"
    done = _run_check(out, timeout=120, STAGES="tests", LIMIT_TESTS="12", PYTEST_ARGS=str(slow))
    summary = (out / "summary.txt").read_text()
    assert done.returncode != 0
    assert _stage(summary, "tests")[1] == "TIMEOUT", summary
    line = summary.split("tests:")[-1].splitlines()[0]
    assert "1 passed" in line and " in " in line, summary


def test_per_test_limit_fails_the_test_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        import time

        def test_hangs():
            time.sleep(60)

        def test_after():
            pass
    """))
    env = dict(os.environ, GPU_CHECK_TEST_TIMEOUT="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "gpu_check_timeout", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-2000:]
    assert "per-test limit of 1 s" in done.stdout


def test_stale_build_lock_is_removed(tmp_path):
    lock = tmp_path / "ext" / "torch2_x" / "cuda" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    keep = lock.parent / "build.ninja"
    keep.write_text("")
    done = subprocess.run(["bash", "-c", f'GPU_CHECK_LIB=1 . "{SCRIPT}"; clear_build_locks "{tmp_path / "ext"}"'],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert not lock.exists() and keep.exists()
    assert "removed stale build lock" in done.stdout


def test_device_names_become_file_names():
    done = subprocess.run(["bash", "-c", f'GPU_CHECK_LIB=1 . "{SCRIPT}"; slug "NVIDIA H200 NVL"; echo; '
                                         'slug "NVIDIA H100 80GB HBM3"'],
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == ["h200-nvl", "h100-80gb-hbm3"]


def _row(preset, contender, median, n_params=1, frac=None, status="ok"):
    return {"preset": preset, "contender": contender, "median_ms": median, "n_params": n_params, "dtype": "float32",
            "status": status, "frac_copy": frac, "gbps": 1.0, "copy_gbps": 1.0}


def test_goal_evaluation():
    rows = [
        _row("gpt2-small", "fromage:cuda", 1.0, 124, frac=0.93), _row("gpt2-small", "torch:adamw", 1.5, 124),
        _row("gpt2-small", "loop", 9.0, 124), _row("gpt2-small", "fromage:triton", 1.1, 124),
        _row("decoder-1b", "fromage:cuda", 10.0, 1100, frac=0.85), _row("decoder-1b", "torch:adamw", 12.0, 1100),
        _row("decoder-1b", "fromage:triton", 12.0, 1100, status="skipped"),
        _row("many-small", "fromage:cuda", 0.2, 22), _row("many-small", "loop", 11.0, 22),
        _row("resnet50", "fromage:cuda", 0.3, 25, frac=0.5),  # smaller than gpt2-small: no copy goal
    ]
    got = {goal: verdict for verdict, goal, _ in gpu_goals.evaluate(rows)}
    assert got["cuda >= 0.90 x copy bandwidth on gpt2-small"] == "PASS"
    assert got["cuda >= 0.90 x copy bandwidth on decoder-1b"] == "MISS"
    assert "cuda >= 0.90 x copy bandwidth on resnet50" not in got
    assert got["cuda <= 0.75 x fused AdamW's time on gpt2-small"] == "PASS"  # 0.667
    assert got["cuda <= 0.75 x fused AdamW's time on decoder-1b"] == "MISS"  # 0.833
    assert got["cuda >= 10x the per-tensor loop on gpt2-small"] == "MISS"  # 9x
    assert got["cuda >= 50x the per-tensor loop on many-small"] == "PASS"  # 55x
    assert got["triton within 15% of cuda on gpt2-small"] == "PASS"
    assert got["triton within 15% of cuda on decoder-1b"] == "ABSENT"  # skipped row
    assert got["triton within 15% of cuda on many-small"] == "ABSENT"


def _lib(command):
    return subprocess.run(["bash", "-c", f'GPU_CHECK_LIB=1 . "{SCRIPT}"; {command}'], capture_output=True, text=True,
                          timeout=120)


def test_the_dependency_list_covers_every_third_party_import():
    # The package, its tests, the examples and the benchmark's helpers: every import that is neither
    # the standard library nor the project's own modules must be on the script's list.
    import ast

    listed = {item.split(":")[0] for item in _lib('echo "$NEEDED_MODULES $OPTIONAL_MODULES"').stdout.split()}
    local = {p.stem for d in ("tests", "benchmarks", "examples") for p in (ROOT / d).glob("*.py")} | {"fromage_fused"}
    used = set()
    for path in [*ROOT.glob("fromage_fused/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("tests/*.py"),
                 *ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module.split(".")[0])
    third_party = used - set(sys.stdlib_module_names) - local
    assert third_party <= listed, f"imported but not checked by gpu_check.sh: {sorted(third_party - listed)}"


def _shadow(root, name, error):
    """A package `name` under `root` that raises `error` on import: first on PYTHONPATH, it stands
    for a module that is absent (ModuleNotFoundError) or present but broken (ImportError)."""
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(f"raise {error}('simulated: {name}', name={name!r})\n")


def test_missing_modules_are_named(tmp_path):
    _shadow(tmp_path, "numpy", "ModuleNotFoundError")
    _shadow(tmp_path, "hypothesis", "ImportError")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run(["bash", "-c", f'GPU_CHECK_LIB=1 . "{SCRIPT}"; missing_modules "{sys.executable}"'],
                          capture_output=True, text=True, timeout=120, env=env)
    out = done.stdout.strip()
    assert out.startswith("numpy (for tests; ModuleNotFoundError); hypothesis (for tests; "
                          "ImportError)"), out + done.stderr
    assert "torch" not in out


def test_a_missing_test_dependency_is_in_the_summary_and_the_other_tests_run(tmp_path):
    # Before, pytest stopped at collection and no test ran; now the summary names the module up
    # front, and only the test modules that import it fail.
    _shadow(tmp_path / "shadow", "numpy", "ModuleNotFoundError")
    out = tmp_path / "out"
    done = _run_check(out, timeout=300, STAGES="tests", PYTHONPATH=str(tmp_path / "shadow"),
                      PYTEST_ARGS="tests/test_cuda_emulated.py tests/test_native_cuda.py")
    summary = (out / "summary.txt").read_text()
    assert "missing:  numpy (for tests; ModuleNotFoundError)" in summary, summary
    line = summary.split("tests:")[-1].splitlines()[0]
    assert "1 error" in line and "skipped" in line, summary + done.stdout[-2000:]


def test_bench_runs_the_goal_deciding_presets_and_contenders_first():
    # A run cut off by its limit keeps its first rows: they must be the ones the goals compare.
    from fromage_fused.bench import contenders as C
    from fromage_fused.bench.presets import PRESETS, numel

    text = SCRIPT.read_text()
    gpu_args = text[text.index('MODE=gpu'):]
    presets = gpu_args.split("--presets ")[1].split()[0].split(",")
    patterns = gpu_args.split("--contenders '")[1].split("'")[0].split(",")
    size = {p: numel(PRESETS[p].shapes(torch.device("cuda"))) for p in presets}
    deciding = [p for p in presets if size[p] >= size[gpu_goals.LARGE_FROM] or p in gpu_goals.LOOP_SPEEDUP]
    assert presets[:len(deciding)] == deciding, f"presets deciding the cuda goals first: {deciding}, got {presets}"
    goal_contenders = {"fromage:cuda", "torch:adamw", "loop", "fromage:triton"}
    assert set(patterns[:len(goal_contenders)]) == goal_contenders, patterns
    # The benchmark runs contenders in the order asked for.
    fake = [C.Contender(name, 20, 20, None, "") for name in
            ["loop", "fromage:cuda", "fromage:triton", "fromage:foreach", "torch:sgd", "torch:adamw"]]
    assert [c.name for c in C.select(fake, patterns)] == patterns
    assert [c.name for c in C.select(fake, ["torch:*", "fromage:*"])] == [
        "torch:sgd", "torch:adamw", "fromage:cuda", "fromage:triton", "fromage:foreach"]


def test_pip_skips_its_version_check():
    assert "pip install --disable-pip-version-check" in SCRIPT.read_text()
