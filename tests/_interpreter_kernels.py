"""Import Triton's kernels under its interpreter, on a machine without CUDA.

Triton chooses the interpreter when a kernel is decorated, so the kernels are imported with
``TRITON_INTERPRET=1``, and the variable is put back afterwards so that it does not reach other
tests' subprocesses. ``tests/_triton_interpreter.py`` does it when imported (at collection); a test
module that wants triton only in its own cases calls :func:`triton_on_cpu` at run time instead, as
importing at collection would add triton to every later module's list of CPU backends.
"""
import importlib
import importlib.util
import os

import pytest
import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
KERNELS = ("engine_pass", "fromage_round", "rule_fromage")


def load() -> None:
    """Import the kernels (under the interpreter where there is no CUDA); idempotent."""
    if not AVAILABLE or torch.cuda.is_available():
        return
    # Newer Triton imports its gluon package at the first launch and asserts there that it was
    # decorated like the kernels it meets; import it first, outside the interpreter, as any launch
    # outside the interpreter would.
    try:
        importlib.import_module("triton.experimental.gluon")
    except ImportError:
        pass
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNELS:
            importlib.import_module(f"fromage_fused.kernels.{name}")
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def triton_on_cpu() -> None:
    """Make the triton backend usable on CPU for the calling test, or skip it."""
    import fromage_fused

    if "triton" in fromage_fused.available_backends("cpu"):
        return
    pytest.importorskip("triton")
    load()
    if "triton" not in fromage_fused.available_backends("cpu"):
        pytest.skip("triton does not run on CPU here")
