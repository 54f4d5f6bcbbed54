"""GradScaler's side of a step.

``torch.amp.GradScaler`` skips its unscale pass for an optimizer with
``_step_supports_amp_scaling = True``, sets ``optimizer.grad_scale`` and ``optimizer.found_inf``
right before ``step()`` and deletes them after a step that returns; every pass of every rule reads
both as device tensors (a non-zero ``found_inf`` skips the pass).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_SCALER_ATTRIBUTES = ("grad_scale", "found_inf")


def scaler_attributes(optimizer) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(grad_scale, found_inf)`` as GradScaler (or a user) set them on ``optimizer``."""
    return getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)


def drop_scaler_attributes(optimizer) -> None:
    """For a step that raises: GradScaler deletes both attributes after ``step()`` returns, but not
    when it raises; it would then read a stale ``grad_scale`` at the next ``scaler.step``
    (multiplying it in, or taking it for the scale of already unscaled gradients) and a plain
    ``step()`` would skip or rescale on old flags. (A plain try/except in ``step``, not a context
    manager: ``fullgraph`` compilation of ``step`` stops at a contextlib manager on older torch.)"""
    for name in _SCALER_ATTRIBUTES:
        optimizer.__dict__.pop(name, None)
