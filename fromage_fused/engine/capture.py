"""CUDA-graph capture: whether one is under way (the one place every part of the package asks),
and the guards of a captured step.

Inside capture nothing may be created that must outlive the replay (state tensors), and no Python
number may be baked into the graph where it is meant to change (``lr``). A table a captured graph
reads is never evicted (``engine/tables.py``, ``csrc/tensor_table.h``).
"""
from __future__ import annotations

import torch


def capturing(device: torch.device) -> bool:
    """True while the current CUDA stream of ``device`` is being captured into a graph."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def refuse_new_state(what: str, device: torch.device, title: str) -> None:
    """Raise if state would be created inside graph capture (a replay would re-initialise it)."""
    if capturing(device):
        raise RuntimeError(
            f"{title} would create its {what} state inside CUDA graph capture, where each replay would "
            "reset it. Run at least one eager step (on a side stream) before capturing, as for torch's "
            "capturable optimizers."
        )


def check_capturable_lr(lr, device: torch.device, title: str) -> None:
    """Under capture ``lr`` must be a tensor on ``device``: a number would be baked into the graph."""
    if not capturing(device):
        return
    if not isinstance(lr, torch.Tensor):
        raise RuntimeError(
            f"a CUDA-graph-captured {title} step needs lr as a tensor on the parameters' device "
            f"(e.g. lr=torch.tensor(0.01, device='{device}')), so that replays read its current value; "
            f"got lr={lr!r}"
        )
    if lr.device != device:
        raise RuntimeError(f"a CUDA-graph-captured {title} step needs lr on {device}, got a tensor on {lr.device}")
