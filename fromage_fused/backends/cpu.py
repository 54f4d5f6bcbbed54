"""The ``cpu`` backend: the extension's C++ kernels, one parallel vectorised pass per phase."""
from .native import NativeBackend

BACKEND = NativeBackend("cpu", "cpu", priority=30)
