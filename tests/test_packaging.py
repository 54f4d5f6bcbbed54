"""The package as pip builds it: what the wheel and the sdist carry, the metadata they declare, the
installed layout finding the C++ sources, and the Makefile's install stamp."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import fromage_fused
from fromage_fused import _build

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in _build.SOURCE_SUFFIXES)
EXTRAS = {"bench", "examples", "triton", "integrations", "docs", "test", "all"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "FROMAGE_FUSED_BUILD_EXT"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)],
                   check=True, env=env, capture_output=True, timeout=300)
    (path,) = out.glob("fromage_fused-*.whl")
    return path


def test_the_wheel_carries_the_extension_sources_and_the_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"fromage_fused/csrc/{s}" for s in SOURCES} <= names
    assert {"fromage_fused/kernels/__init__.py", "fromage_fused/kernels/engine_pass.py"} <= names
    assert not any(n.endswith((".so", "_C.json")) for n in names)  # a plain wheel compiles nothing
    assert wheel.name.endswith("-py3-none-any.whl")


def test_the_wheel_carries_every_module_of_the_package(wheel):
    # pyproject.toml lists the packages (kernels/ and csrc/ are mapped into the package): a new
    # subpackage (a rule) must be listed there, or an installed package would lack it.
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f"fromage_fused/{p.relative_to(ROOT / 'fromage_fused').as_posix()}"
               for p in (ROOT / "fromage_fused").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(modules - names)
    assert not missing, f"not in the wheel (list their packages in pyproject.toml): {missing}"


def test_the_wheel_declares_torch_extras_and_the_console_script(wheel):
    archive = zipfile.ZipFile(wheel)
    info = f"fromage_fused-{fromage_fused.__version__}.dist-info"
    meta = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    assert meta["Version"] == fromage_fused.__version__
    assert set(meta.get_all("Provides-Extra")) == EXTRAS
    requires = meta.get_all("Requires-Dist")
    base = [r for r in requires if "extra ==" not in r]
    assert sorted(base) == ["ninja", "torch>=2.6"]
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    bench = [r for r in requires if 'extra == "bench"' in r]
    assert any(r.startswith("tqdm") for r in bench) and any(r.startswith("matplotlib") for r in bench)
    assert any(r.startswith("scikit-learn") for r in requires if 'extra == "examples"' in r)
    assert "fromage-bench = fromage_fused.bench.__main__:main" in archive.read(f"{info}/entry_points.txt").decode()


def test_an_installed_package_finds_its_own_sources(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fromage_fused; from fromage_fused import _build;"
            "from fromage_fused.backends import native;"
            "print(fromage_fused.__file__); print(_build.CSRC); print(native._prerequisite_problem('cpu'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(tmp_path))
    assert out[1] == str(tmp_path / "fromage_fused" / "csrc")
    assert out[2] == "None"


def test_the_sdist_carries_everything_a_wheel_is_built_from(tmp_path):
    # (sys.path[0], the checkout, would let its kernels/ shadow the kernels package of the same name,
    # whose setuptools hook transformers' dependency installs.)
    code = "import sys; del sys.path[0]; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    env = {k: v for k, v in os.environ.items() if k != "FROMAGE_FUSED_BUILD_EXT"}
    name = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          check=True, env=env).stdout.strip().splitlines()[-1]
    top = f"fromage_fused-{fromage_fused.__version__}"
    members = {m.split("/", 1)[1] for m in tarfile.open(tmp_path / name).getnames() if "/" in m}
    needed = {"pyproject.toml", "setup.py", "LICENSE", "README.md", "CHANGELOG.md", "CITATION.cff", "docs/design.md",
              "fromage_fused/__init__.py", "kernels/engine_pass.py", "tests/conftest.py"}
    assert needed | {f"csrc/{s}" for s in SOURCES} <= members
    assert name == f"{top}.tar.gz"


def test_the_design_document_is_in_the_project_and_nothing_cites_another():
    assert (ROOT / "docs" / "design.md").is_file()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    stale = []
    for name in tracked.stdout.splitlines():
        path = ROOT / name
        if path.suffix in (".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".sh", ".toml", ".txt", ".cff",
                           "") and path.is_file():
            text = path.read_text(errors="replace")
            if "DESIGN.md" in text and path.name != "test_packaging.py":
                stale.append(name)
    assert stale == []


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_the_install_stamp_follows_torch(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()

    def plan(torch):
        out = subprocess.run(["make", "-n", "test", f"VENV={venv}", f"TORCH={torch}"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return [line for line in out.splitlines() if "pip install" in line and "torch==" in line]

    stamp = venv / ".installed-torch__2.13.0"
    stamp.touch()
    os.utime(stamp, (2**31, 2**31))  # newer than pyproject.toml, setup.py and requirements-dev.txt
    assert plan("torch==2.13.0") == []
    assert plan("torch==2.14.1") == [f'{venv}/bin/python -m pip install -q "torch==2.14.1"']


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_run_installs_only_the_bench_extra(tmp_path):
    # The front door: the benchmark's venv gets torch, the [bench] extra and timm's optimizer files
    # (what the LARS and LAMB rows compare with; without timm's dependencies, whose torchvision pins
    # torch), not the test requirements (pytest, Triton for its interpreter tests, the integrations').
    out = subprocess.run(["make", "-n", "run", f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    installs = [line for line in out.splitlines() if "pip install" in line and "torch==" not in line]
    assert installs[-2].endswith('-e ".[bench]"'), installs
    assert installs[-1].endswith('--no-deps "timm==1.0.31"'), installs
    unwanted = ("[test]", "triton", "requirements-dev", "torchvision")
    assert not any(word in line for line in installs for word in unwanted)
