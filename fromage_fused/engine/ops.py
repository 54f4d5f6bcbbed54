"""The engine's ops, defined once: one schema and one fake implementation for every namespace that
implements them.

``pass_`` runs pass ``index`` of rule ``rule`` over one group: ``writes`` are the pass's written
lists (concatenated, each of the group's ``n`` tensors), ``reads`` the others; ``sums`` the previous
pass's per-tensor sums; ``hyper`` and ``flags`` the packed hyper-parameters; ``scalars`` the rule's
per-tensor scalar states in use (one ``[n]`` tensor each, written in place); ``globals`` a combining
pass's global values; ``found_inf``, ``grad_scale``, ``seed`` as everywhere; ``backend`` a token
that a backend with several instances uses to find its own (the native ops ignore it). It returns
the pass's ``[n, k]`` per-tensor sums (``k`` may be 0).

``fromage_fused::pass_`` is implemented by the C++ extension (CPU and CUDA kernels register their
implementations only), ``fromage_fused_triton::pass_`` by the triton backend. The fake
implementation gives ``torch.compile`` the output's shape, from the rule's declaration.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

__all__ = ["PASS_SCHEMA", "NATIVE", "TRITON", "define"]

PASS_SCHEMA = ("(str rule, int index, Tensor(a!)[] writes, Tensor[] reads, Tensor? sums, Tensor hyper, int flags, "
               "Tensor(b!)[] scalars, Tensor? globals, Tensor? found_inf, Tensor? grad_scale, Tensor? seed, "
               "int backend) -> Tensor")
NATIVE = "fromage_fused::pass_"
TRITON = "fromage_fused_triton::pass_"
_libraries = {}


def _fake(rule: str, index: int, writes: List[torch.Tensor], reads: List[torch.Tensor], sums: Optional[torch.Tensor],
          hyper: torch.Tensor, flags: int, scalars: List[torch.Tensor], globals: Optional[torch.Tensor],
          found_inf: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor], seed: Optional[torch.Tensor],
          backend: int) -> torch.Tensor:
    from ..rules import registered

    spec = registered()[rule].passes[index]
    n = (len(writes) + len(reads)) // len(spec.lists)
    return hyper.new_empty((n, spec.sums), dtype=torch.float32)


def define(qualname: str, impl: Optional[Callable] = None) -> None:
    """Define ``qualname`` with the engine's schema and its fake implementation (once per process);
    ``impl``: a Python implementation for every device (the triton backend's), else the C++
    extension registers its own."""
    if qualname in _libraries:
        return
    namespace, name = qualname.split("::")
    library = torch.library.Library(namespace, "FRAGMENT")
    library.define(name + PASS_SCHEMA)
    if impl is not None:
        library.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, _fake, lib=library)
    _libraries[qualname] = library
