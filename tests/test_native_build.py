"""Loading the C++ extension: a lazy build (never inside a query), its cache keyed on the sources
and flags, recovery from a killed build's lock, the prebuilt binary's checks, fallback and errors
when it cannot be built, torch.compile over its ops, and an install that needs no compiler."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

import fromage_fused
from fromage_fused import _build, backends, functional
from fromage_fused.backends import native
from _native import fromage_apply_op, fromage_stats_op, require_native

ROOT = Path(__file__).resolve().parents[1]


def _fresh_state():
    return {"loaded": None, "error": None, "cuda_error": None}


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """A loader that has loaded nothing, with an empty build cache and no prebuilt binary."""
    monkeypatch.setattr(native, "_state", _fresh_state())
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_prebuilt_origin", lambda: None)
    monkeypatch.delenv(native.REQUIRE_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def broken_build(unbuilt, monkeypatch):
    """A fresh loader whose build fails, as with a compile error."""
    def fail():
        raise backends.BackendUnavailable("the C++ extension could not be built: no compiler (simulated)")

    monkeypatch.setattr(native, "_load_once", fail)


def test_queries_never_build(unbuilt, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a query started a build")

    monkeypatch.setattr(native, "_load_once", no_build)
    monkeypatch.setattr(native, "_compile", no_build)
    assert backends.get("cpu").unavailable_reason(torch.device("cpu")) is None
    assert "cpu" in fromage_fused.available_backends("cpu")
    report = fromage_fused.backend_report("cpu")
    assert report["cpu"] == f"available, {native.NOT_BUILT}"
    assert report["foreach"] == "available" and report["reference"] == "available"
    assert not unbuilt.exists()


def test_auto_ranks_an_unbuilt_native_backend_first_and_builds_it_on_first_use(unbuilt, monkeypatch):
    built = []
    monkeypatch.setattr(native, "_load_once", lambda: built.append(1) or "jit-cpu")
    monkeypatch.setattr(native, "_register_fakes", lambda: None)
    assert backends.resolve("auto", "cpu").name == "cpu"
    assert backends.resolve("auto", "cpu").name == "cpu"
    assert built == [1]  # once per process
    assert fromage_fused.backend_report("cpu")["cpu"] == "available"


def test_auto_falls_back_with_one_warning_when_the_build_fails(broken_build):
    assert "cpu" in fromage_fused.available_backends("cpu")  # not tried yet
    with pytest.warns(RuntimeWarning, match="'cpu' failed to load.*no compiler"):
        chosen = backends.resolve("auto", "cpu")
    assert chosen.name == "foreach"
    p, g = torch.randn(5), torch.randn(5)
    functional.fromage([p], [g], None, lr=0.1)  # still steps, through the fallback
    assert "cpu" not in fromage_fused.available_backends("cpu")
    assert "no compiler" in fromage_fused.backend_report("cpu")["cpu"]


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
    assert (backends.get("cpu").priority_on(torch.device("cpu"))
            > backends.get("foreach").priority_on(torch.device("cpu")))


def test_missing_sources_give_a_clear_reason(unbuilt, monkeypatch, tmp_path):
    monkeypatch.setattr(_build, "CSRC", tmp_path / "empty")
    with pytest.raises(backends.BackendUnavailable, match="missing from .*reinstall fromage_fused"):
        native.status("cpu")
    assert "reinstall" in fromage_fused.backend_report("cpu")["cpu"]
    with pytest.raises(backends.BackendUnavailable, match="missing from"):
        native.load()


def test_no_compiler_is_a_reason_before_any_build(unbuilt, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-fromage")
    with pytest.raises(backends.BackendUnavailable, match="no C\\+\\+ compiler found"):
        native.status("cpu")


def test_never_the_cuda_build_without_cuda(monkeypatch):
    monkeypatch.setattr(native, "cuda_unbuildable_reason", lambda: None)  # a CUDA torch with nvcc...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ...on a machine without a GPU
    assert native._variants() == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert native._variants() == ["cuda", "cpu"]


def test_a_failed_cuda_build_is_what_the_report_says_for_cuda(monkeypatch):
    require_native()
    if native.has_cuda_kernels():
        pytest.skip("this build has the CUDA kernels")
    monkeypatch.setattr(native, "_state", {"loaded": "jit-cpu", "error": None,
                                           "cuda_error": "JIT build (cuda) failed: nvcc fatal (simulated)"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(native.REQUIRE_ENV, raising=False)
    report = fromage_fused.backend_report("cuda:0")
    assert "no CUDA kernels" in report["cuda"] and "nvcc fatal (simulated)" in report["cuda"]


def test_the_build_cache_is_keyed_on_sources_flags_and_torch(monkeypatch, tmp_path):
    copy = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, copy)
    monkeypatch.setattr(_build, "CSRC", copy)
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path / "cache"))
    first = native.build_dir("cpu")
    assert first.parent == tmp_path / "cache" and first.name.startswith("cpu-")
    assert native.build_dir("cpu") == first  # stable
    assert native.build_dir("cuda") != first
    header = copy / "numerics.h"
    header.write_text(header.read_text() + "\n// one more line\n")  # a header, not only the .cpp
    edited = native.build_dir("cpu")
    assert edited != first
    info = _build.build_info("cpu")
    assert _build.build_key(dict(info, torch="0.0.0")) != _build.build_key(info)
    assert _build.build_key(dict(info, cflags=_build.cpu_compile_flags(None))) != _build.build_key(info)


def test_first_use_build_says_so_on_stderr_in_one_line_each_way(unbuilt, monkeypatch, capfd):
    calls = []

    def fake_load(name, build_directory, **kwargs):
        calls.append(kwargs)
        Path(build_directory, f"{name}{native._LIB_SUFFIX}").write_bytes(b"")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    native._jit("cpu")
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"building the fromage_fused C++ extension for torch {torch.__version__} (first use, "
                               "1-2 minutes on a 2-core CPU; cached for later runs)")
    assert lines[1].startswith("fromage_fused: built the C++ extension in ")
    assert len(calls) == 1 and calls[0]["with_cuda"] is False
    assert json.loads((native.build_dir("cpu") / "built.json").read_text())["sources"] == _build.sources_hash()
    assert native.pending("cpu") is None  # a finished build is found without building


def test_a_stale_torch_lock_does_not_hang_the_next_build():
    """torch's FileBaton waits for ever while build_dir/lock exists; a killed build leaves it."""
    require_native()
    if native._state["loaded"] == "prebuilt":
        pytest.skip("the prebuilt extension is in use")
    directory = native.build_dir("cpu")
    record = directory / "built.json"
    saved = record.read_text()
    record.unlink()  # unfinished, as after a kill: the next process must run torch's build
    (directory / "lock").write_text("")
    env = dict(os.environ, **{native.DIR_ENV: str(native.cache_root())})
    try:
        done = subprocess.run([sys.executable, "-c", "from fromage_fused.backends import native; print(native.load())"],
                              env=env, capture_output=True, text=True, timeout=240)
    finally:
        (directory / "lock").unlink(missing_ok=True)
        if not record.exists():
            record.write_text(saved)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "jit-cpu"
    assert "removed a stale build lock" in done.stderr


def test_waiting_for_another_build_is_bounded(tmp_path, monkeypatch, capfd):
    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setenv(native.WAIT_ENV, "1")
    holder = open(tmp_path / "build.lock", "a+")
    holder.write("4242")
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(backends.BackendUnavailable, match="pid 4242.*building"):
            with native._build_lock(tmp_path):
                pass
    finally:
        holder.close()
    assert "waiting for another process (pid 4242)" in capfd.readouterr().err
    with native._build_lock(tmp_path) as locked:  # free again
        assert locked


def _record(tmp_path, **fields):
    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    record = {"torch": torch.__version__, "cuda": False, "isa": None, "sources": _build.sources_hash(),
              "sha256": _build.file_sha256(library)}
    record.update(fields)
    (tmp_path / "_C.json").write_text(json.dumps(record))
    return str(library)


def test_a_prebuilt_binary_is_loaded_only_where_it_fits(tmp_path, monkeypatch):
    assert native.prebuilt_problem(_record(tmp_path)) is None
    assert "torch 1.0.0" in native.prebuilt_problem(_record(tmp_path, torch="1.0.0"))
    assert "other sources" in native.prebuilt_problem(_record(tmp_path, sources="0" * 64))
    monkeypatch.setattr(_build, "cpu_flags_here", lambda: {"sse2", "sse4_2", "avx"})  # no AVX2
    assert native.prebuilt_problem(_record(tmp_path,
                                           isa="avx2")) == "it was compiled for avx2 and this CPU lacks avx2, f16c, fma"
    assert native.prebuilt_problem(_record(tmp_path, isa=None)) is None
    monkeypatch.setattr(_build, "cpu_flags_here", lambda: set(_build.AVX2_CPU_FLAGS))
    monkeypatch.setattr(_build, "cpu_isa", lambda: None)  # cpuid (torch) disagrees, or ATEN_CPU_CAPABILITY
    assert "torch detects CPU capability" in native.prebuilt_problem(_record(tmp_path, isa="avx2"))
    (tmp_path / "_C.json").unlink()
    assert "no readable build record" in native.prebuilt_problem(str(tmp_path / "_C.so"))


def test_a_prebuilt_binary_that_does_not_match_its_checksum_is_not_loaded(tmp_path):
    origin = _record(tmp_path)
    Path(origin).write_bytes(b"\0" * 64)  # overwritten (or truncated) after its record was written
    assert "checksum" in native.prebuilt_problem(origin)
    assert "checksum" in native.prebuilt_problem(_record(tmp_path, sha256=None))  # a record without one


def test_an_unfit_prebuilt_binary_is_left_for_the_jit_build_with_its_reason(unbuilt, tmp_path, monkeypatch):
    origin = _record(tmp_path, isa="avx2")
    monkeypatch.setattr(_build, "cpu_flags_here", lambda: {"sse2"})
    monkeypatch.setattr(native, "_prebuilt_origin", lambda: origin)
    loaded, jitted = [], []
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    monkeypatch.setattr(native, "_jit", lambda variant, why: jitted.append((variant, why)))
    assert native._load_once() == "jit-cpu"
    assert loaded == []  # never executed: it would die with an illegal instruction
    assert jitted == [("cpu", "the prebuilt extension is not used: it was compiled for avx2 and this CPU lacks avx2, "
                              "f16c, fma")]
    assert native.pending("cpu") == native.NOT_BUILT


def test_plain_setup_needs_neither_torch_nor_a_compiler():
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version'];"
            "runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "FROMAGE_FUSED_BUILD_EXT"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == fromage_fused.__version__


def test_prebuilt_build_under_isolation_asks_for_the_installed_torch_release():
    code = ("import sys; sys.modules['torch'] = None; from setuptools import build_meta;"
            "print(build_meta.get_requires_for_build_wheel())")
    env = dict(os.environ, FROMAGE_FUSED_BUILD_EXT="1")
    env.pop("FROMAGE_FUSED_BUILD_TORCH", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    requires = out.stdout.strip().splitlines()[-1]
    assert f"'torch=={torch.__version__.split('+')[0]}'" in requires and "'ninja'" in requires


def test_torch_compile_traces_the_ops_through_their_fake_implementations():
    require_native()
    params = [torch.randn(33, 7), torch.randn(4100)]
    grads = [torch.randn_like(p) for p in params]
    max_norm = torch.full((len(params),), -1.0)

    def step(ps, gs, mns, lr):
        stats = fromage_stats_op(ps, gs, True)
        fromage_apply_op(ps, gs, stats, lr, mns, 1.0, False, True, None, None, None)

    eager_p, eager_m = [p.clone() for p in params], max_norm.clone()
    step(eager_p, grads, eager_m, torch.tensor(0.05))
    assert (eager_m > 0).all()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(params, grads, max_norm, torch.tensor(0.05))
    assert all(torch.equal(a, b) for a, b in zip(params, eager_p))
    assert torch.equal(max_norm, eager_m)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fp = [mode.from_tensor(p) for p in params]
        out = fromage_stats_op(fp, fp, True)
        assert out.shape == (2, 3) and out.dtype == torch.float32


def _fake_builds(monkeypatch, content=b"a library"):
    """torch's JIT build replaced by one that writes ``content`` as the library (and counts builds),
    and library loading by a recorder: nothing is compiled or executed."""
    builds, loaded = [], []

    def fake_load(name, build_directory, **kwargs):
        builds.append(sorted(p.name for p in Path(build_directory).iterdir()))
        Path(build_directory, "ninja.o").write_bytes(b"an object")
        Path(build_directory, f"{name}{native._LIB_SUFFIX}").write_bytes(content)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    return builds, loaded


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "no_checksum", "unreadable_record", "fails_to_load"])
def test_a_damaged_cached_build_is_built_again_once_and_says_so(unbuilt, monkeypatch, capfd, damage):
    builds, loaded = _fake_builds(monkeypatch)
    native._jit("cpu")
    directory = native.build_dir("cpu")
    library = directory / f"{native._library_name('cpu')}{native._LIB_SUFFIX}"
    record = json.loads((directory / "built.json").read_text())
    assert record["sha256"] == _build.file_sha256(library) and record["size"] == library.stat().st_size
    assert len(builds) == 1 and loaded == []  # (torch's load() loads what it built)
    capfd.readouterr()
    if damage == "zeroed":  # the same size: only the checksum tells
        library.write_bytes(bytes(library.stat().st_size))
    elif damage == "truncated":  # loading it would kill the process (SIGBUS)
        library.write_bytes(library.read_bytes()[:3])
    elif damage == "no_checksum":
        del record["sha256"]
        (directory / "built.json").write_text(json.dumps(record))
    elif damage == "unreadable_record":
        (directory / "built.json").write_text("{")
    else:
        def refuse(path):
            raise OSError("could not load this library (simulated)")

        monkeypatch.setattr(torch.ops, "load_library", refuse)
    native._checksums.clear()  # (a new process)
    native._jit("cpu")
    err = capfd.readouterr().err
    assert len(builds) == 2 and builds[1] == ["build.lock"]  # from scratch: the old files removed
    assert "is not usable" in err and "building it again" in err
    if damage != "fails_to_load":
        assert loaded == []  # the damaged library was never loaded
    assert json.loads((directory / "built.json").read_text())["sha256"] == _build.file_sha256(library)


def test_an_intact_cached_build_is_loaded_without_building(unbuilt, monkeypatch):
    builds, loaded = _fake_builds(monkeypatch)
    native._jit("cpu")
    native._checksums.clear()
    native._jit("cpu")
    assert len(builds) == 1 and loaded == [str(native.build_dir("cpu")
                                               / f"{native._library_name('cpu')}{native._LIB_SUFFIX}")]


def test_a_truncated_build_in_the_cache_never_kills_the_process(tmp_path):
    """The real library, truncated in a copy of the cache: the loader must not map it (SIGBUS);
    it builds again (here, a build that fails at once) and says why."""
    require_native()
    if native._state["loaded"] == "prebuilt":
        pytest.skip("the prebuilt extension is in use")
    source = native.build_dir("cpu")
    cache = tmp_path / "cache"
    shutil.copytree(source, cache / source.name, ignore=shutil.ignore_patterns("build.lock", "lock"))
    library = cache / source.name / f"{native._library_name('cpu')}{native._LIB_SUFFIX}"
    library.write_bytes(library.read_bytes()[:4096])
    code = ("import torch.utils.cpp_extension as ext\n"
            "def fail(*a, **k): raise RuntimeError('compile error (simulated)')\n"
            "ext.load = fail\n"
            "from fromage_fused.backends import native\n"
            "try:\n    native.load()\nexcept Exception as exc:\n    print('unavailable:', exc)\n")
    env = dict(os.environ, **{native.DIR_ENV: str(cache)})
    env.pop(native.REQUIRE_ENV, None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "building it again" in done.stderr
    assert "unavailable:" in done.stdout and "compile error (simulated)" in done.stdout


def test_the_cuda_build_key_has_the_gpu_architectures(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    capabilities = {0: (9, 0), 1: (8, 0), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    assert _build.cuda_archs() == "8.0 9.0"
    hopper_and_ampere = _build.build_key(_build.build_info("cuda"))
    capabilities.update({0: (8, 0), 2: (8, 0)})
    assert _build.build_key(_build.build_info("cuda")) != hopper_and_ampere  # another machine's GPUs
    cpu = _build.build_key(_build.build_info("cpu"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0;8.0")  # the list torch compiles for, when given
    assert _build.cuda_archs() == "8.0 9.0"
    assert _build.build_key(_build.build_info("cuda")) == hopper_and_ampere
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
    assert _build.build_key(_build.build_info("cuda")) != hopper_and_ampere
    assert _build.build_key(_build.build_info("cpu")) == cpu  # CPU builds are shared across GPUs
