"""The LAMB rule and its optimizer (see ``rule.py``). Not exported from ``fromage_fused`` until the
native and Triton kernels run it."""
from .optimizer import LAMB
from .rule import LAMB_RULE

RULE = LAMB_RULE

__all__ = ["LAMB", "LAMB_RULE", "RULE"]
