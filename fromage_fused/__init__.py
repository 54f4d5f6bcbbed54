"""fromage_fused: the Fromage optimizer as a couple of multi-tensor launches per step."""
from .backends import available_backends, backend_names
from .optimizer import Fromage
from . import functional

__all__ = ["Fromage", "available_backends", "backend_names", "functional"]
__version__ = "0.1.0"
