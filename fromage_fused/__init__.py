"""fromage_fused: Fromage and its family (LARS, LAMB) as a couple of multi-tensor launches per step."""
from ._graph_tables import release_graph_tables
from .backends import available_backends, backend_names, backend_report
from .rules.fromage import Fromage
from .rules.lamb import LAMB
from .rules.lars import LARS
from .rules.fromage.param_groups import param_groups
from . import functional
from .trust import deep_relative_trust, gradient_breakdown, max_safe_lr, relative_changes

__all__ = ["Fromage", "LARS", "LAMB", "param_groups", "available_backends", "backend_names", "backend_report",
           "functional", "deep_relative_trust", "relative_changes", "max_safe_lr", "gradient_breakdown",
           "release_graph_tables"]
__version__ = "0.1.0"
