"""The ``cuda`` backend: the extension's multi-tensor CUDA kernels, two launches per group."""
from .native import NativeBackend

BACKEND = NativeBackend("cuda", "cuda", priority=35)
