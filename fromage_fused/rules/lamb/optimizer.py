"""``LAMB``: the engine's optimizer with the LAMB rule, timm's ``Lamb`` signature."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ...engine.optimizer import EngineOptimizer
from ...engine.spec import check_lr
from .rule import LAMB_RULE, check_corrected, same_max_grad_norm

__all__ = ["LAMB"]


class LAMB(EngineOptimizer):
    r"""LAMB (layer-wise adaptive moments; You et al. 2019), as timm's ``Lamb`` (after apex's FusedLAMB).

    Once per step, the gradients of all param groups together are clipped to ``max_grad_norm``
    (``c = max(||g|| / max_grad_norm, 1)``); then per parameter, with the group's step count ``t``::

        m = beta1 * m + (1 - beta1) * g / c                (beta3 = 1 without grad_averaging)
        v = beta2 * v + (1 - beta2) * (g / c)**2
        u = (m / (1 - beta1**t)) / (sqrt(v) / sqrt(1 - beta2**t) + eps)   (no corrections without bias_correction)
        if caution: k = (u * g > 0); u = u * k / max(mean(k), 1e-3)
        if weight_decay != 0:
            decoupled_decay: p = p - s * weight_decay * p, s = lr**2 / max_lr if corrected_weight_decay else lr
            otherwise:       u = u + weight_decay * p
        if weight_decay != 0 or always_adapt:
            r = ||p|| / ||u|| (1 if either is 0); r = min(r, 1) with trust_clip; u = r * u
        p = p - lr * u

    Args:
        params: parameters or parameter groups.
        lr: learning rate (a float or a 0-d tensor).
        bias_correction: Adam's bias corrections of the moments.
        betas: the moments' coefficients, each in [0, 1).
        eps: added to the denominator, after the bias-corrected square root.
        weight_decay: weight decay; a group with a non-zero value is adapted by the trust ratio.
        grad_averaging: the new gradient enters ``m`` with ``1 - beta1`` (else with 1).
        max_grad_norm: the global gradient norm clipped to (None: no clipping). One value for all
            param groups: a param group given another value is refused.
        trust_clip: ``min(r, 1)``.
        always_adapt: adapt groups without weight decay too.
        caution: cautious update (Liang et al. 2024): only where the update agrees in sign with the gradient.
        decoupled_decay: shrink ``p`` by ``lr * weight_decay`` outside the trust ratio.
        corrected_weight_decay: with ``decoupled_decay``, shrink by ``lr**2 / max_lr`` instead, where
            ``max_lr`` is the ``lr`` given here (kept in every group as ``max_lr_snapshot``, as timm does).
        foreach: timm's choice of implementation; only None (the default) is accepted: choose with ``backend``.
        backend: ``"auto"`` or one of :func:`fromage_fused.available_backends`.
        monitor: keep per-parameter statistics of each step (norms, trust ratio, relative change),
            read with ``last_stats()`` (``opt.monitor`` switches it at any time).
        stochastic_rounding: round bf16 parameters stochastically (unbiased; a per-group value).
        seed: the stochastic rounding's seed (default: drawn from torch's generator, only when a
            group rounds stochastically).

    State: ``exp_avg`` and ``exp_avg_sq`` (float32 for bf16/fp16 parameters); per param group
    ``step``, a 0-d float32 tensor on the device of the group's first parameter, advanced at every
    step whether or not the group has gradients. Gradients are never modified. Works with
    ``torch.amp.GradScaler`` without an unscale pass: gradients are divided by the scale, and a step
    with infinite gradients changes nothing (step counts included).
    """

    rule = LAMB_RULE

    def __init__(self, params, lr=1e-3, bias_correction: bool = True, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.01, grad_averaging: bool = True, max_grad_norm=1.0, trust_clip: bool = False,
                 always_adapt: bool = False, caution: bool = False, decoupled_decay: bool = False,
                 corrected_weight_decay: bool = False, foreach=None, *, backend: str = "auto", monitor: bool = False,
                 stochastic_rounding: bool = False, seed: Optional[int] = None):
        if foreach is not None:
            raise ValueError(f"foreach={foreach!r}: timm's choice of its implementations; this LAMB's is its backend "
                             "(backend='foreach', 'reference', ... or 'auto')")
        check_lr("lr", lr)  # before it is read for the snapshot
        # timm's snapshot: a float copy of the constructor's lr (a tensor lr edited later does not move it)
        max_lr = float(lr.detach().cpu()) if isinstance(lr, torch.Tensor) else float(lr)
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, trust_clip=trust_clip,
                        always_adapt=always_adapt, caution=caution, decoupled_decay=decoupled_decay,
                        corrected_weight_decay=corrected_weight_decay, max_lr_snapshot=max_lr,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, backend=backend, monitor=monitor, seed=seed)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        # The value every group holds (a loaded checkpoint may have replaced the constructor's).
        held = self.param_groups[0]["max_grad_norm"] if self.param_groups else self.defaults["max_grad_norm"]
        if "max_grad_norm" in param_group and not same_max_grad_norm(param_group["max_grad_norm"], held):
            raise ValueError(f"max_grad_norm={param_group['max_grad_norm']!r} in a param group: it clips the gradients "
                             f"of all param groups together ({held!r} here); give it to the constructor")
        spec = self.rule.spec
        values = {name: param_group.get(name, self.defaults[name]) for name in spec.names}
        values["max_grad_norm"] = param_group.get("max_grad_norm", held)
        spec.check(values)
        check_corrected(values)
        param_group.setdefault("max_grad_norm", held)
        super().add_param_group(param_group)
