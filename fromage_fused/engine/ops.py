"""The engine's ops, defined once: one schema and one fake implementation for every namespace that
implements them.

``pass_`` runs pass ``index`` of rule ``rule`` over one group: ``writes`` are the pass's written
lists (concatenated, each of the group's ``n`` tensors), ``reads`` the others; ``sums`` the previous
pass's per-tensor sums; ``hyper`` and ``flags`` the packed hyper-parameters; ``scalars`` the rule's
per-tensor scalar states in use (one ``[n]`` tensor each, written in place); ``globals`` a combining
pass's global values; ``found_inf``, ``grad_scale``, ``seed`` as everywhere; ``backend`` a token
that a backend with several instances uses to find its own (the native ops ignore it). It returns
the pass's ``[n, k]`` per-tensor sums (``k`` may be 0).

``pass_pair`` (CPU) runs pass ``index`` and the next one over one group tensor block by tensor
block, each block's second pass right after its first while the block is in cache: ``writes`` /
``reads`` and ``writes_next`` / ``reads_next`` are the two passes' lists, ``globals`` and
``globals_next`` what each reads; a block is the next tensors until the first pass's lists of them
hold ``block_bytes`` (at least one tensor). The second pass reads the first's sums of each tensor
and returns none. It returns the first pass's sums; sums and results are bit for bit those of two
``pass_`` calls. (No stochastic rounding; the executor calls it only eagerly: ``engine/execute.py``.)

``fromage_fused::pass_`` is implemented by the C++ extension (CPU and CUDA kernels register their
implementations only), ``fromage_fused_triton::pass_`` by the triton backend. The fake
implementation gives ``torch.compile`` the output's shape, from the rule's declaration.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

__all__ = ["PASS_SCHEMA", "READ_SCHEMA", "PAIR_SCHEMA", "NATIVE", "PAIR", "TRITON", "define", "define_pair",
           "call"]

PASS_SCHEMA = ("(str rule, int index, Tensor(a!)[] writes, Tensor[] reads, Tensor? sums, Tensor hyper, int flags, "
               "Tensor(b!)[] scalars, Tensor? globals, Tensor? found_inf, Tensor? grad_scale, Tensor? seed, "
               "int backend) -> Tensor")
#: The same for a pass that writes nothing (no written list, no per-tensor scalar): inductor cannot
#: lower a mutating op whose mutable lists are all empty.
READ_SCHEMA = ("(str rule, int index, Tensor[] reads, Tensor? sums, Tensor hyper, int flags, Tensor? globals, "
               "Tensor? found_inf, Tensor? grad_scale, Tensor? seed, int backend) -> Tensor")
PAIR_SCHEMA = ("(str rule, int index, Tensor(a!)[] writes, Tensor[] reads, Tensor(c!)[] writes_next, "
               "Tensor[] reads_next, Tensor? sums, Tensor hyper, int flags, Tensor(b!)[] scalars, Tensor? globals, "
               "Tensor? globals_next, Tensor? found_inf, Tensor? grad_scale, int block_bytes) -> Tensor")
READ_SUFFIX = "_reads"
NATIVE = "fromage_fused::pass_"
PAIR = "fromage_fused::pass_pair"
TRITON = "fromage_fused_triton::pass_"
_libraries = {}


def _fake(rule: str, index: int, writes: List[torch.Tensor], reads: List[torch.Tensor], sums: Optional[torch.Tensor],
          hyper: torch.Tensor, flags: int, scalars: List[torch.Tensor], globals: Optional[torch.Tensor],
          found_inf: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor], seed: Optional[torch.Tensor],
          backend: int) -> torch.Tensor:
    from ..rules import registered

    spec = registered()[rule].passes[index]
    n = (len(writes) + len(reads)) // len(spec.lists_for(flags)[0])
    return hyper.new_empty((n, spec.sums_for(flags)), dtype=torch.float32)


def _fake_pair(rule, index, writes, reads, writes_next, reads_next, sums, hyper, flags, scalars, globals, globals_next,
               found_inf, grad_scale, block_bytes):
    return _fake(rule, index, writes, reads, sums, hyper, flags, scalars, globals, found_inf, grad_scale, None, 0)


def _fake_reads(rule, index, reads, sums, hyper, flags, globals, found_inf, grad_scale, seed, backend):
    return _fake(rule, index, [], reads, sums, hyper, flags, [], globals, found_inf, grad_scale, seed, backend)


def call(namespace, rule: str, index: int, writes, reads, sums, hyper, flags: int, scalars, globals, found_inf,
         grad_scale, seed, backend: int) -> torch.Tensor:
    """Call the pass op of ``namespace`` (``torch.ops.<ns>``), through its read-only form when the
    pass writes nothing (under ``torch.compile``; eagerly both are the same)."""
    if not writes and not scalars and torch.compiler.is_compiling():
        return getattr(namespace, "pass_" + READ_SUFFIX)(rule, index, reads, sums, hyper, flags, globals, found_inf,
                                                         grad_scale, seed, backend)
    return namespace.pass_(rule, index, writes, reads, sums, hyper, flags, scalars, globals, found_inf, grad_scale,
                           seed, backend)


def _library(qualname: str, schema: str, fake: Callable):
    """A new library fragment defining ``qualname`` with ``schema`` and its fake implementation, or
    None if this process has defined it already."""
    if qualname in _libraries:
        return None
    namespace, name = qualname.split("::")
    library = torch.library.Library(namespace, "FRAGMENT")
    library.define(name + schema)
    torch.library.register_fake(qualname, fake, lib=library)
    _libraries[qualname] = library
    return library


def define(qualname: str, impl: Optional[Callable] = None) -> None:
    """Define ``qualname`` with the engine's schema and its fake implementation (once per process);
    ``impl``: a Python implementation for every device (the triton backend's), else the C++
    extension registers its own."""
    library = _library(qualname, PASS_SCHEMA, _fake)
    if library is None:
        return
    namespace, name = qualname.split("::")
    if impl is not None:
        library.impl(name, impl, "CompositeExplicitAutograd")
    # The read-only form runs the op itself with empty mutable lists.
    op = getattr(getattr(torch.ops, namespace), name)

    def reads_impl(rule, index, reads, sums, hyper, flags, globals, found_inf, grad_scale, seed, backend):
        return op(rule, index, [], reads, sums, hyper, flags, [], globals, found_inf, grad_scale, seed, backend)

    library.define(name + READ_SUFFIX + READ_SCHEMA)
    library.impl(name + READ_SUFFIX, reads_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname + READ_SUFFIX, _fake_reads, lib=library)


def define_pair(qualname: str = PAIR) -> None:
    """Define ``qualname`` with the schema of ``pass_pair`` and its fake implementation (once per
    process); the C++ extension registers its CPU kernel."""
    _library(qualname, PAIR_SCHEMA, _fake_pair)
