"""The ahead-of-time build of the C++/CUDA extension; the metadata lives in pyproject.toml.

A plain install compiles nothing: the package carries the sources (``fromage_fused/csrc``) and
the extension is JIT-built on first use. ``FROMAGE_FUSED_BUILD_EXT=1 pip install .`` builds it
now as ``fromage_fused._C`` (with the CUDA kernels where torch is a CUDA build and nvcc is found),
beside ``_C.json``, the record the loader checks before it loads the binary: the torch it was
compiled for, the sources' hash, the CPU instruction set, the binary's checksum.

With build isolation, torch (and ninja) become build requirements: the same torch release as the
one installed in the environment being installed into (``FROMAGE_FUSED_BUILD_TORCH=<requirement>``
overrides), since a binary is only loaded by the torch it was compiled for; any other is left for
the JIT build, with the reason printed. ``--no-build-isolation`` builds against the torch at hand.
``FROMAGE_FUSED_BUILD_ISA=baseline`` compiles the CPU kernels without AVX2 (for a binary that
must run on any x86-64 CPU); by default they use what the building machine has, and the loader
refuses such a binary on a CPU without it.
"""
import importlib.util
import json
import os
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _wanted() -> bool:
    return os.environ.get("FROMAGE_FUSED_BUILD_EXT", "").strip() not in ("", "0")


def _installed_torch():
    """The torch version of the environment being installed into. An isolated build hides that
    environment's site-packages from sys.path, but runs its interpreter, so they are found here."""
    from importlib import metadata

    paths = list(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    for dist in metadata.distributions(path=paths):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def _build_requirements():
    wanted = os.environ.get("FROMAGE_FUSED_BUILD_TORCH", "").strip()
    if not wanted:
        version = _installed_torch()
        # The release without its local label (+cpu, +cu130): an index that has the labelled
        # build serves it first, as it sorts above the plain one.
        wanted = f"torch=={version.split('+')[0]}" if version else "torch>=2.6"
    return [wanted, "ninja"]


def _extension_kwargs():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    spec = importlib.util.spec_from_file_location("_fromage_build", ROOT / "fromage_fused" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    chosen = os.environ.get("FROMAGE_FUSED_BUILD_ISA", "").strip().lower()
    isa = None if chosen in ("baseline", "none") else build.cpu_isa()
    with_cuda = build.cuda_unbuildable_reason() is None
    sources = build.CPU_SOURCES + (build.CUDA_SOURCES if with_cuda else [])
    make = CUDAExtension if with_cuda else CppExtension
    ext = make(
        "fromage_fused._C",
        [f"csrc/{s}" for s in sources],
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": build.cpu_compile_flags(isa), "nvcc": build.cuda_compile_flags()},
        extra_link_args=build.openmp_flags(),
        py_limited_api=False,
    )
    import torch

    record = {"torch": torch.__version__, "cuda": with_cuda, "isa": isa, "sources": build.sources_hash(ROOT / "csrc")}

    def recorded(path):
        """What the record at ``path`` says the binary was built for (without its checksum)."""
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        stored.pop("sha256", None)
        return stored

    class BuildWithRecord(BuildExtension):
        def run(self):
            libraries = [Path(self.get_ext_fullpath(e.name)) for e in self.extensions]
            records = [library.with_name("_C.json") for library in libraries]
            # setuptools keeps a binary whose sources did not change, even if it was compiled for
            # another torch (a second install from the same tree): rebuild unless the record matches.
            if any(recorded(path) != record for path in records):
                self.force = True
            super().run()
            for library, path in zip(libraries, records):
                # The loader checks the binary against this checksum before it loads it.
                path.write_text(json.dumps(dict(record, sha256=build.file_sha256(library)), indent=1) + "\n")

    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildWithRecord})


def _have_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ValueError:  # sys.modules["torch"] is None: hidden on purpose
        return False


kwargs = {}
if _wanted():
    if not _have_torch():
        # An isolated build environment: setuptools' PEP 517 backend turns these into build
        # requirements, installs them, and runs this file again.
        kwargs = dict(setup_requires=_build_requirements())
    else:
        kwargs = _extension_kwargs()

setup(**kwargs)
