"""The LARS rule and its optimizer (see ``rule.py``). Not exported from ``fromage_fused`` until the
native and Triton kernels run it."""
from .optimizer import LARS
from .rule import LARS_RULE

RULE = LARS_RULE

__all__ = ["LARS", "LARS_RULE", "RULE"]
