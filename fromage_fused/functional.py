"""The functional form of Fromage (``fromage_fused.functional``): it lives with the rule, in
``rules/fromage/functional.py``."""
from .rules.fromage.functional import *  # noqa: F401,F403
from .rules.fromage.functional import __all__  # noqa: F401
