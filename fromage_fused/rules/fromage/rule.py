"""The Fromage rule (Bernstein et al., NeurIPS 2020): its hyper-parameters, state and passes.

    a = lr·‖p‖/‖g‖  if ‖p‖ > 0 and ‖g‖ > 0,  else  lr / grad_scale   (the zero-norm fallback)
    s = 1/√(1+lr²)  (1 with prefactor=False)
    p ← s·(p − a·g)
    with p_bound:  max_norm = p_bound·‖p‖ before the first applied step (float32, set once);
                   if ‖p‖ > max_norm after the update, s ← s·max_norm/‖p‖

Pass 0 reduces ``‖p‖², ‖g‖², ⟨p,g⟩`` per tensor (the post-update norm is
``s²(‖p‖² − 2a⟨p,g⟩ + a²‖g‖²)``, so the clamp needs no second look at the data); pass 1 derives
the coefficients from them and writes ``p ← c_p·p + c_g·g``: 20 bytes per fp32 parameter.
"""
from __future__ import annotations

import numbers

import torch

from ...engine.rounding import SR_SEED, STOCHASTIC_ROUNDING
from ...engine.rule import Pass, Rule, TensorScalar
from ...engine.spec import Spec, check_lr, check_positive_or_none, flag, option, setting, value
from .coefficients import UNSET_MAX_NORM
from .flags import BOUND, INNER
from .param_groups import check_weight_decay, warn_traps
from .foreach import Foreach
from .reference import Reference


def _bounded(values) -> bool:
    return values["p_bound"] is not None


class FromageRule(Rule):
    name = "fromage"
    title = "Fromage"
    spec = Spec(
        value("lr", 0.01, check_lr, tensor=True),
        option("p_bound", None, check_positive_or_none),
        flag("maximize", False),
        flag("prefactor", True),
        STOCHASTIC_ROUNDING,
        # Accepted, checked and saved for the frameworks that pass it; Fromage has none (param_groups.py).
        setting("weight_decay", 0.0, lambda name, value, read=True: check_weight_decay(value)),
    )
    state = (TensorScalar("max_norm", torch.float32, UNSET_MAX_NORM, when=_bounded), SR_SEED)
    passes = (
        Pass("stats", lists=("p", "g"), sums=3),
        Pass("apply", lists=("p", "g"), writes=1),
    )
    # The Python math of each Python backend, in its own module (the kernels' is in csrc/rule_fromage.h and
    # kernels/rule_fromage.py).
    reference = Reference()
    foreach = Foreach()
    #: The authors' implementation keeps the bound as state["max"], a Python float.
    AUTHORS_MAX = "max"

    def flags(self, values, monitor: bool) -> int:
        bits = self.spec.flags(values)
        if values["p_bound"] is not None:
            bits |= BOUND | INNER
        elif monitor:
            bits |= INNER
        return bits

    def convert_loaded(self, entry: dict):
        authors = entry.get(self.AUTHORS_MAX)
        if "max_norm" not in entry and isinstance(authors, numbers.Real) and not isinstance(authors, bool):
            return {"max_norm": float(authors)}, (self.AUTHORS_MAX,)
        return {}, ()

    def warn(self, optimizer, group_indices, stacklevel: int) -> None:
        warn_traps(optimizer, group_indices, stacklevel + 1)

    def summarize(self, record):
        from .monitor import summarize

        return summarize(record)


FROMAGE = FromageRule()
