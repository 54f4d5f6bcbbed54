"""``LARS``: the engine's optimizer with the LARS rule, timm's ``Lars`` signature."""
from __future__ import annotations

from typing import Any, Dict, Optional

from ...engine.optimizer import EngineOptimizer
from .rule import LARS_RULE, check_nesterov

__all__ = ["LARS"]


class LARS(EngineOptimizer):
    r"""LARS (layer-wise adaptive rate scaling; You et al. 2017), as timm's ``Lars`` (after apex's LARC).

    For each parameter ``p`` with gradient ``g``::

        if weight_decay != 0 or always_adapt:
            r = trust_coeff * ||p|| / (||g|| + weight_decay * ||p|| + eps)   (1 if ||p|| or ||g|| is 0)
            if trust_clip: r = min(r / lr, 1)
            d = (g + weight_decay * p) * r
        else:
            d = g
        with momentum: buf = d at the first step, then momentum * buf + (1 - dampening) * d;
                       d = d + momentum * buf (nesterov) or buf
        p = p - lr * d

    Args:
        params: parameters or parameter groups.
        lr: learning rate (a float or a 0-d tensor).
        momentum: momentum factor (0: no buffer).
        dampening: dampening of the momentum's new term.
        weight_decay: weight decay; a group with a non-zero value is adapted by the trust ratio.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        trust_coeff: the trust coefficient of the ratio.
        eps: added to the ratio's denominator.
        trust_clip: LARC's clipping, ``min(r / lr, 1)``: the local rate capped by ``lr``.
        always_adapt: adapt groups without weight decay too.
        backend: ``"auto"`` or one of :func:`fromage_fused.available_backends`.
        monitor: keep per-parameter statistics of each step (norms, trust ratio, local learning
            rate), read with ``last_stats()`` (``opt.monitor`` switches it at any time).
        stochastic_rounding: round bf16 parameters stochastically (unbiased; a per-group value).
        seed: the stochastic rounding's seed (default: drawn from torch's generator, only when a
            group rounds stochastically).

    State: ``momentum_buffer`` (torch's and timm's name; float32 for bf16/fp16 parameters) and
    ``momentum_started``, with momentum only. Works with ``torch.amp.GradScaler`` without an unscale
    pass: gradients are divided by the scale, and a step with infinite gradients changes nothing.
    """

    rule = LARS_RULE

    def __init__(self, params, lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov: bool = False,
                 trust_coeff=0.001, eps=1e-8, trust_clip: bool = False, always_adapt: bool = False, *,
                 backend: str = "auto", monitor: bool = False, stochastic_rounding: bool = False,
                 seed: Optional[int] = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, backend=backend, monitor=monitor, seed=seed)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        spec = self.rule.spec
        values = {name: param_group.get(name, self.defaults[name]) for name in spec.names}
        spec.check(values)
        check_nesterov(values)
        super().add_param_group(param_group)
