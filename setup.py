"""Install fromage_fused. ``kernels/`` installs as ``fromage_fused.kernels``.

A plain install needs no compiler: the C++/CUDA extension is then JIT-built on first use.
``FROMAGE_FUSED_BUILD_EXT=1 pip install --no-build-isolation -e .`` builds it now instead, as
``fromage_fused._C`` (with the CUDA kernels where torch is a CUDA build and nvcc is found).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

kwargs = {}
if os.environ.get("FROMAGE_FUSED_BUILD_EXT", "").strip() not in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    spec = importlib.util.spec_from_file_location("_fromage_build", Path(__file__).parent / "fromage_fused" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    with_cuda = build.cuda_unbuildable_reason() is None
    sources = build.CPU_SOURCES + (build.CUDA_SOURCES if with_cuda else [])
    make = CUDAExtension if with_cuda else CppExtension
    ext = make(
        "fromage_fused._C",
        [f"csrc/{s}" for s in sources],
        include_dirs=[str(build.CSRC)],
        extra_compile_args={"cxx": build.cpu_compile_flags(), "nvcc": build.cuda_compile_flags()},
        py_limited_api=False,
    )
    kwargs = dict(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})

setup(
    name="fromage_fused",
    version="0.1.0",
    description="The Fromage optimizer for PyTorch as a couple of fused multi-tensor launches per step",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["fromage_fused", "fromage_fused.backends", "fromage_fused.kernels", "fromage_fused.bench"],
    package_dir={"fromage_fused.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    entry_points={"console_scripts": ["fromage-bench=fromage_fused.bench.__main__:main"]},
    **kwargs,
)
