"""Triton's kernels on a machine without CUDA: imported under the interpreter.

Triton chooses the interpreter when a kernel is decorated, so the kernels are imported here with
``TRITON_INTERPRET=1``, and the variable is put back afterwards so that it does not reach other
tests' subprocesses. Import this module before anything imports ``fromage_fused.kernels``.
"""
import importlib.util
import os

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None

if AVAILABLE and not torch.cuda.is_available():
    # Newer Triton imports its gluon package at the first launch and asserts there that it was
    # decorated like the kernels it meets; import it first, outside the interpreter, as any launch
    # outside the interpreter would.
    try:
        importlib.import_module("triton.experimental.gluon")
    except ImportError:
        pass
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import fromage_fused.kernels.fromage_apply  # noqa: F401
        import fromage_fused.kernels.fromage_round  # noqa: F401
        import fromage_fused.kernels.fromage_stats  # noqa: F401
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved
