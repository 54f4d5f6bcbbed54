"""The LARS rule (You et al. 2017, as timm's ``Lars``; docs/lars_lamb_semantics.md): its
hyper-parameters, state and passes.

    if weight_decay != 0 or always_adapt:
        r = trust_coeff·‖p‖ / (‖g‖ + weight_decay·‖p‖ + eps)   if ‖p‖ > 0 and ‖g‖ > 0,  else 1
        if trust_clip:  r <- min(r / lr, 1)
        d = (g + weight_decay·p)·r
    else:
        d = g
    if momentum != 0:
        buf <- d at the parameter's first applied step, else momentum·buf + (1 - dampening)·d
        d <- d + momentum·buf if nesterov, else buf
    p <- p - lr·d

Pass 0 reduces ``‖p‖², ‖g‖²`` per tensor (only when the trust ratio applies, or for the monitor);
pass 1 reads p, g and the buffer and writes p and the buffer (and, for the monitor, reduces ‖u‖² of
the step ``p ← p − lr·u``). A buffer made zeros by the engine cannot say whether it has
started, and a started one can be all zeros, so a per-tensor flag (``momentum_started``, 0 or 1)
records it: the first applied step writes ``buf = d`` (not ``(1 - dampening)·d``). The engine sets
the flag after each applied step (``TensorScalar.after``: every block of a tensor reads it during
the step), and a step that ``found_inf`` skips leaves it at 0, so the next applied step is still
the first.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...engine.rounding import SR_SEED, STOCHASTIC_ROUNDING
from ...engine.rule import Buffer, Pass, Rule, TensorScalar
from ...engine.spec import Spec, check_finite, check_lr, check_non_negative, flag, real, value
from .flags import ADAPT, MOMENTUM, MONITOR
from .foreach import Foreach
from .reference import Reference

__all__ = ["LARS_RULE", "LarsRule", "check_nesterov", "NOT_STARTED", "STARTED"]

NOT_STARTED, STARTED = 0.0, 1.0


def check_nesterov(values: Mapping[str, Any]) -> None:
    """timm's (and torch's SGD's) condition, checked at construction and ``add_param_group``: Nesterov
    momentum needs a momentum and no dampening. Not at every step: a schedule that takes momentum to
    0 at the end of training is fine (the step is then plain SGD, as in timm)."""
    if values["nesterov"] and (real(values["momentum"]) <= 0 or real(values["dampening"]) != 0):
        raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening, got "
                         f"momentum={values['momentum']!r}, dampening={values['dampening']!r}")


def _momentum(values: Mapping[str, Any]) -> bool:
    # real(): None (true) for a value the checks will refuse, never a tensor compared on the host
    return real(values["momentum"]) != 0


def adapts(values: Mapping[str, Any]) -> bool:
    return real(values["weight_decay"]) != 0 or values["always_adapt"] is True


class LarsRule(Rule):
    name = "lars"
    title = "LARS"
    # timm's names, defaults and order (its signature's)
    spec = Spec(
        value("lr", 1.0, check_lr, tensor=True),
        value("momentum", 0.0, check_non_negative),
        value("dampening", 0.0, check_finite),
        value("weight_decay", 0.0, check_non_negative),
        flag("nesterov", False),
        value("trust_coeff", 0.001, check_non_negative),
        value("eps", 1e-8, check_non_negative),
        flag("trust_clip", False),
        flag("always_adapt", False),
        STOCHASTIC_ROUNDING,  # this package's: bf16 parameters rounded stochastically (seeded)
    )
    # torch's SGD name for the buffer; both exist only while momentum is not 0 (a rebuild creates
    # them when a schedule turns momentum on: Rule.present)
    state = (Buffer("momentum_buffer", when=_momentum),
             TensorScalar("momentum_started", torch.float32, NOT_STARTED, when=_momentum, after=STARTED), SR_SEED)
    passes = (
        Pass("stats", lists=("p", "g"), sums=2, when=ADAPT | MONITOR),
        # monitoring: the update also reduces ‖u‖² of its step p ← p − lr·u (the change of p)
        Pass("apply", lists=("p", "momentum_buffer", "g"), writes=2, optional=(("momentum_buffer", MOMENTUM),),
             sums=1, summed=MONITOR),
    )
    reference = Reference()
    foreach = Foreach()

    def flags(self, values, monitor: bool) -> int:
        bits = self.spec.flags(values)
        if _momentum(values):
            bits |= MOMENTUM
        if adapts(values):
            bits |= ADAPT
        if monitor:
            bits |= MONITOR
        return bits

    def summarize(self, record):
        from .monitor import summarize

        return summarize(record)

    def convert_loaded(self, entry: dict):
        # A checkpoint of timm's Lars or torch's SGD holds a buffer that has started, and no flag.
        if "momentum_started" not in entry and isinstance(entry.get("momentum_buffer"), torch.Tensor):
            return {"momentum_started": STARTED}, ()
        return {}, ()


LARS_RULE = LarsRule()
