"""The LAMB rule and its optimizer (see ``rule.py``), exported as ``fromage_fused.LAMB``."""
from .optimizer import LAMB
from .rule import LAMB_RULE

RULE = LAMB_RULE

__all__ = ["LAMB", "LAMB_RULE", "RULE"]
