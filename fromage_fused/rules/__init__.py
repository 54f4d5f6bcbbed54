"""The rules: one subpackage per optimizer, each defining ``RULE`` (a ``engine.rule.Rule``).

A rule joins by adding its subpackage here (found by name, like the backends) and its line in the
native rule list (``csrc/rules.h``).
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Dict

__all__ = ["registered"]


@lru_cache(maxsize=None)
def registered() -> Dict[str, object]:
    """Every rule of the package by name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        rule = getattr(importlib.import_module(f"{__name__}.{info.name}"), "RULE", None)
        if rule is not None:
            found[rule.name] = rule
    return found
