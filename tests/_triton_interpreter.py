"""Triton's kernels on a machine without CUDA: imported under the interpreter when this module is
imported (see ``_interpreter_kernels.py``). Import it before anything imports
``fromage_fused.kernels``."""
from _interpreter_kernels import AVAILABLE, load

load()

__all__ = ["AVAILABLE"]
