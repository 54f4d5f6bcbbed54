"""Tensors of one step must not share memory: a parameter stepped twice (``Fromage([p, p])``, tied
storage ``dec.data = enc.data``, overlapping views) is updated twice, racily in the parallel
kernels, and a gradient that is another parameter's memory is read after that parameter changed.

:func:`first_overlap` finds two overlapping tensors among n in O(n log n): each tensor's memory
as a byte range ``[start, end)`` of its device, sorted, then one sweep. Ranges are conservative for
strided views (two interleaved views of one storage count as overlapping): parameters are whole
tensors or plain slices in practice. A gradient may be its own parameter's memory (same address,
shape and strides: each element then reads itself before it is written); any other overlap is
refused.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["first_overlap", "refuse_overlaps"]


def _span(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """The bytes ``t`` reads and writes, or None when it has none (empty, or no storage)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    start = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def first_overlap(tensors: Sequence[torch.Tensor], written: Optional[Sequence[bool]] = None) -> Optional[Tuple[int, int]]:
    """Positions ``(i, j)``, ``i < j``, of two tensors whose memory ranges overlap, at least one of
    them ``written`` (default: all are), or None. Tensors only read may overlap each other."""
    ranges = []
    for i, t in enumerate(tensors):
        span = _span(t)
        if span is not None:
            ranges.append((str(t.device), span[0], span[1], i))
    ranges.sort()
    device = None
    # The furthest end reached so far on this device by any range, and by a written one.
    any_end = any_index = write_end = write_index = None
    for dev, start, end, i in ranges:
        if dev != device:
            device, any_end, any_index, write_end, write_index = dev, None, None, None, None
        writes = written is None or written[i]
        if write_end is not None and start < write_end:
            return min(i, write_index), max(i, write_index)
        if writes and any_end is not None and start < any_end:
            return min(i, any_index), max(i, any_index)
        if any_end is None or end > any_end:
            any_end, any_index = end, i
        if writes and (write_end is None or end > write_end):
            write_end, write_index = end, i
    return None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def refuse_overlaps(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], name: Callable[[int], str]) -> None:
    """RuntimeError naming the two if any parameters overlap, or a gradient overlaps a parameter
    other than its own (``name(i)`` says which parameter ``params[i]`` is)."""
    tensors: List[torch.Tensor] = list(params)
    owners: List[int] = list(range(len(params)))
    for i, (p, g) in enumerate(zip(params, grads)):
        if not _same_memory(p, g):
            tensors.append(g)
            owners.append(i)
    n = len(params)
    found = first_overlap(tensors, [k < n for k in range(len(tensors))])
    if found is None:
        return
    i, j = found
    if j < n:
        raise RuntimeError(
            f"{name(i)} and {name(j)} share memory (the same tensor twice, tied storage, or overlapping "
            "views): each would be stepped on its own. Pass a shared tensor once, e.g. as model.parameters() does.")
    # (j is a gradient; i, the one written, a parameter)
    raise RuntimeError(
        f"the gradient of {name(owners[j])} shares memory with {name(i)}, which the step writes. Give it a "
        "gradient of its own (a gradient may be its own parameter's memory, the same elements, and nothing else).")
