"""The Fromage rule and its optimizer (see ``rule.py``)."""
from .coefficients import UNSET_MAX_NORM, coefficients
from .optimizer import Fromage
from .rule import FROMAGE

RULE = FROMAGE

__all__ = ["Fromage", "FROMAGE", "RULE", "UNSET_MAX_NORM", "coefficients"]
