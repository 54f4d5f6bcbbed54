"""The float64 LAMB oracle: a literal transcription of docs/lars_lamb_semantics.md (LAMB).

One step over plain lists of float64 tensors, a Python decision per tensor, gradients read and
never written. ``groups`` is a list of dicts, one per param group, each with ``params`` (tensors
stepped in place), ``grads`` (tensors or None), ``state`` (one dict per parameter, empty until the
parameter's first applied step), ``step`` (the group's step count, an int, 0 before the first step)
and any hyper-parameter under its timm name; a missing one takes its default (``DEFAULTS``).
``max_grad_norm`` is one value for the whole optimizer (the clipping is global). ``max_lr`` is
the learning rate the optimizer was constructed with (corrected weight decay divides by it). Loss
scaling as torch's fused optimizers: every gradient is divided by ``grad_scale``, and a step with a
non-zero ``found_inf`` changes nothing at all, not even the step counts.
"""
from __future__ import annotations

import math

import torch

#: timm's ``Lamb`` defaults, by name (``max_grad_norm`` is an argument of the step, not of a group).
DEFAULTS = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, grad_averaging=True,
                trust_clip=False, always_adapt=False, caution=False, decoupled_decay=False,
                corrected_weight_decay=False)
MAX_GRAD_NORM = 1.0
#: The floor of the fraction of agreeing signs that rescales a cautious update.
CAUTION_FLOOR = 1e-3


def _value(x):
    return float(x) if torch.is_tensor(x) else x


def clip_divisor(groups, max_grad_norm, scale=None):
    """max(‖g‖/max_grad_norm, 1) over every gradient of every group; None when nothing clips."""
    grads = [g for group in groups for g in group["grads"] if g is not None]
    if max_grad_norm is None or not grads:
        return None
    total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    if scale is not None:
        total /= scale
    return max(total / max_grad_norm, 1.0)


def lamb_step(groups, *, max_grad_norm=MAX_GRAD_NORM, max_lr=None, grad_scale=None, found_inf=None):
    if found_inf is not None and _value(found_inf) != 0:
        return
    scale = None if grad_scale is None else _value(grad_scale)
    clip = clip_divisor(groups, max_grad_norm, scale)
    for group in groups:
        h = dict(DEFAULTS, **{k: v for k, v in group.items() if k in DEFAULTS})
        # The count is the group's: it advances at every applied step, gradients or not.
        group["step"] = group.get("step", 0) + 1
        t = group["step"]
        lr, wd = _value(h["lr"]), h["weight_decay"]
        beta1, beta2 = h["betas"]
        c1 = 1 - beta1 ** t if h["bias_correction"] else 1.0
        c2 = 1 - beta2 ** t if h["bias_correction"] else 1.0
        into_m = 1 - beta1 if h["grad_averaging"] else 1.0
        for p, grad, state in zip(group["params"], group["grads"], group["state"]):
            if grad is None:
                continue
            g = grad if scale is None else grad / scale
            if clip is not None:
                g = g / clip
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m = state["exp_avg"] = beta1 * state["exp_avg"] + into_m * g
            v = state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
            u = (m / c1) / (v.sqrt() / math.sqrt(c2) + h["eps"])
            if h["caution"]:
                agree = (u * g > 0).double()
                share = float(agree.mean()) if agree.numel() else 1.0
                u = u * agree / max(share, CAUTION_FLOOR)
            if wd != 0:
                if h["decoupled_decay"]:
                    shrink = lr * lr / max_lr if h["corrected_weight_decay"] else lr
                    p.sub_(shrink * wd * p)
                else:
                    u = u + wd * p
            if wd != 0 or h["always_adapt"]:
                # ‖p‖ after a decoupled decay, before the update.
                p_norm, u_norm = float(p.norm()), float(u.norm())
                ratio = p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
                if h["trust_clip"]:
                    ratio = min(ratio, 1.0)
                u = u * ratio
            p.sub_(lr * u)
