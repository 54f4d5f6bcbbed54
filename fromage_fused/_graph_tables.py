"""Tensor tables held for captured CUDA graphs, released on request.

The ``cuda`` and ``triton`` backends describe a group's tensors to their kernels by tables in
device memory, cached by what they hold. A table used while a CUDA graph is captured is held (the
graph reads it at every replay), up to a bound per cache; past it, a capture that needs another
table raises. Only the user knows when a graph is freed for good: this is how to say so.
"""
import torch


def release_graph_tables() -> int:
    """Let go of every tensor table held for captured CUDA graphs (the ``cuda`` and ``triton``
    backends): they become ordinary cache entries, evicted as any. Call it only when no graph captured
    with fromage_fused steps will replay again (their tables may then be freed and reused). Returns
    the number of tables released."""
    from .backends import triton as _triton

    released = sum(backend.release_graph_tables() for backend in list(_triton._INSTANCES.values()))
    # Present only where the CUDA ops of the extension are loaded; nothing is built or loaded here.
    if hasattr(torch.ops.fromage_fused, "_release_graph_tables"):
        released += int(torch.ops.fromage_fused._release_graph_tables())
    return released
