"""What the optimizer needs to run inside real training loops: loss scaling, graph capture, seeds.

- ``torch.amp.GradScaler`` sets ``optimizer.grad_scale`` and ``optimizer.found_inf`` right before
  ``step()`` and deletes them after a step that returns; a step that raises must not leave them
  behind for a later step (see :func:`drop_scaler_attributes`).
- Inside CUDA-graph capture nothing may be created that must outlive the replay (state tensors)
  and no Python number may be baked into the graph where it is meant to change (``lr``).
- Stochastic rounding takes one int64 seed tensor per (param group, device), kept in the state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._math import usable_lr

_SCALER_ATTRIBUTES = ("grad_scale", "found_inf")
_MASK63 = (1 << 63) - 1


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


def capturing(device: torch.device) -> bool:
    """True while the current CUDA stream of ``device`` is being captured into a graph."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def refuse_new_state(what: str, device: torch.device) -> None:
    """Raise if state would be created inside graph capture (a replay would re-initialise it)."""
    if capturing(device):
        raise RuntimeError(
            f"Fromage would create its {what} state inside CUDA graph capture, where each replay would "
            "reset it. Run at least one eager step (on a side stream) before capturing, as for torch's "
            "capturable optimizers."
        )


def check_capturable_lr(lr, device: torch.device) -> None:
    """Under capture ``lr`` must be a tensor on ``device``: a number would be baked into the graph."""
    if not capturing(device):
        return
    if not isinstance(lr, torch.Tensor):
        raise RuntimeError(
            "a CUDA-graph-captured Fromage step needs lr as a tensor on the parameters' device "
            f"(e.g. lr=torch.tensor(0.01, device='{device}')), so that replays read its current value; "
            f"got lr={lr!r}"
        )
    if lr.device != device:
        raise RuntimeError(f"a CUDA-graph-captured Fromage step needs lr on {device}, got a tensor on {lr.device}")


def initial_seed(seed: Optional[int]) -> int:
    """The optimizer's base seed: ``seed`` when given, else a draw from torch's default generator
    (so ``torch.manual_seed`` makes a run reproducible)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    return seed & _MASK63


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def group_seed(base: int, group_index: int, device: torch.device) -> int:
    """Distinct, well-mixed start values for the seed of each (param group, device)."""
    device_index = -1 if device.index is None else device.index
    return _splitmix64(_splitmix64(base) ^ _splitmix64((group_index << 8) ^ (device_index & 0xFF))) & _MASK63


def advance_seed(seed: torch.Tensor, found_inf: Optional[torch.Tensor], lr=None) -> None:
    """Move the seed on by one on the device; a step skipped by ``found_inf`` or by an unusable
    tensor ``lr`` (``_math.usable_lr``) leaves it as it was."""
    applied = None
    if isinstance(lr, torch.Tensor):
        applied = usable_lr(lr.to(seed.device, non_blocking=True))
    if found_inf is not None:
        no_inf = found_inf.to(seed.device, non_blocking=True) == 0
        applied = no_inf if applied is None else applied & no_inf
    seed.add_(1 if applied is None else applied.reshape(()).to(torch.int64))
