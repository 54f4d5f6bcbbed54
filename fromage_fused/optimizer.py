"""``fromage_fused.optimizer.Fromage``: the optimizer lives with its rule (``rules/fromage/``)."""
from .rules.fromage.optimizer import Fromage

__all__ = ["Fromage"]
