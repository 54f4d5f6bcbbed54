"""The LARS rule and its optimizer (see ``rule.py``), exported as ``fromage_fused.LARS``."""
from .optimizer import LARS
from .rule import LARS_RULE

RULE = LARS_RULE

__all__ = ["LARS", "LARS_RULE", "RULE"]
