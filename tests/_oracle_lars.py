"""The float64 LARS oracle: a literal transcription of docs/lars_lamb_semantics.md (LARS).

One step over plain lists of float64 tensors, a Python decision per tensor, gradients read and
never written. ``groups`` is a list of dicts, one per param group, each with ``params`` (tensors
stepped in place), ``grads`` (tensors or None), ``state`` (one dict per parameter, empty until the
parameter's first applied step) and any hyper-parameter under its timm name; a missing one takes
its default (``DEFAULTS``). Loss scaling as torch's fused optimizers: every gradient is divided by
``grad_scale``, and a step with a non-zero ``found_inf`` changes nothing at all.
"""
from __future__ import annotations

import torch

#: timm's ``Lars`` defaults, by name.
DEFAULTS = dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, trust_coeff=0.001,
                eps=1e-8, trust_clip=False, always_adapt=False)


def _value(x):
    return float(x) if torch.is_tensor(x) else x


def trust_ratio(p_norm, g_norm, *, lr, weight_decay, trust_coeff, eps, trust_clip):
    """The factor the (decayed) gradient is multiplied by, as a float64 0-d tensor."""
    p_norm = torch.as_tensor(p_norm, dtype=torch.float64)
    g_norm = torch.as_tensor(g_norm, dtype=torch.float64)
    if p_norm > 0 and g_norm > 0:
        ratio = trust_coeff * p_norm / (g_norm + weight_decay * p_norm + eps)
    else:
        ratio = torch.ones((), dtype=torch.float64)
    if trust_clip:
        # min(ratio / lr, 1); a zero lr gives ratio / 0 = inf, so 1 (a zero step either way).
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def lars_step(groups, *, grad_scale=None, found_inf=None):
    if found_inf is not None and _value(found_inf) != 0:
        return
    scale = None if grad_scale is None else _value(grad_scale)
    for group in groups:
        h = dict(DEFAULTS, **{k: v for k, v in group.items() if k in DEFAULTS})
        lr, wd, mu = _value(h["lr"]), h["weight_decay"], h["momentum"]
        for p, grad, state in zip(group["params"], group["grads"], group["state"]):
            if grad is None:
                continue
            g = grad if scale is None else grad / scale
            if wd != 0 or h["always_adapt"]:
                r = trust_ratio(p.norm(), g.norm(), lr=lr, weight_decay=wd, trust_coeff=h["trust_coeff"],
                                eps=h["eps"], trust_clip=h["trust_clip"])
                g = (g + wd * p) * r
            if mu != 0:
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"] = mu * state["momentum_buffer"] + (1 - h["dampening"]) * g
                buf = state["momentum_buffer"]
                g = g + mu * buf if h["nesterov"] else buf
            p.sub_(lr * g)
