"""What a rule declares: its spec, its state, its passes, and where its math lives.

A step runs the rule's passes in order over every group of tensors (one device and dtype, one
backend). A :class:`Pass` touches some tensor lists (``"p"``, ``"g"``, or the name of an
elementwise buffer), writes the first ``writes`` of them in place, and may reduce ``sums``
per-tensor sums (an ``[n, sums]`` tensor in the accumulation dtype) that the next pass's
per-tensor coefficients read. After a pass with ``combine``, the rule's :meth:`Rule.combine` turns
every group's sums (of whole tensors: sharded ones are all-reduced first) into global values
that every group's later passes receive.

What a pass touches may depend on the flags the rule computes for the step (never on a tensor's
value): a list named in ``optional`` is present only when its flag bit is set (LARS's momentum
buffer), a pass with ``when`` runs only when one of those bits is set (else its sums are zeros,
and nothing is read), and a pass with ``summed`` reduces its sums only when one of those bits is
set (LARS's update measures itself for the monitor; else it has none). Every backend, the kernels
and the ops' fake implementation see the same lists and sums: :meth:`Pass.lists_for`,
:meth:`Pass.sums_for`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch

from .spec import Spec

__all__ = ["Pass", "Buffer", "TensorScalar", "GroupScalar", "Rule"]


@dataclass(frozen=True)
class Pass:
    name: str
    #: the tensor lists the pass touches, the written ones first
    lists: Tuple[str, ...]
    writes: int = 0
    sums: int = 0
    combine: bool = False
    #: ``(list name, flag bit)`` pairs: the list is present only when the bit is set in the flags
    optional: Tuple[Tuple[str, int], ...] = ()
    #: flag bits of which one must be set for the pass to run (0: it always runs)
    when: int = 0
    #: flag bits of which one must be set for the pass to reduce its ``sums`` (0: whenever it runs)
    summed: int = 0

    def lists_for(self, flags: int) -> Tuple[Tuple[str, ...], int]:
        """The lists present under ``flags``, in order, and how many of them are written."""
        if not self.optional:
            return self.lists, self.writes
        absent = {name for name, bit in self.optional if not flags & bit}
        names = tuple(n for n in self.lists if n not in absent)
        return names, self.writes - sum(n in absent for n in self.lists[:self.writes])

    def runs(self, flags: int) -> bool:
        return not self.when or bool(flags & self.when)

    def sums_for(self, flags: int) -> int:
        """How many per-tensor sums the pass reduces under ``flags``."""
        return self.sums if not self.summed or flags & self.summed else 0


def _always(values) -> bool:
    return True


@dataclass(frozen=True)
class Buffer:
    """Elementwise state: the parameter's shape, in :func:`~fromage_fused.engine.dtypes.buffer_dtype`,
    zeros when the plan first steps the parameter (a group whose values fail ``when`` has none)."""

    name: str
    when: Callable[[Mapping[str, Any]], bool] = _always


@dataclass(frozen=True)
class TensorScalar:
    """One number per tensor: a 0-d ``dtype`` state tensor per parameter, laid out as views of one
    ``[n]`` tensor per group; created holding ``unset`` when the parameter joins a group whose
    values pass ``when`` (so that checkpoint tools find it), written by the kernels, or, with
    ``after``, set to that value by the engine after each step that is applied (one that
    ``found_inf`` or an unusable tensor lr skips leaves it): a kernel cannot write a value that
    the tensor's other blocks still read."""

    name: str
    dtype: torch.dtype
    unset: float
    when: Callable[[Mapping[str, Any]], bool] = _always
    after: Optional[float] = None


@dataclass(frozen=True)
class GroupScalar:
    """A 0-d ``dtype`` device tensor per param group, which the engine advances by ``advance`` on
    the device after every step that ``found_inf`` does not skip; passes read it as it was before
    the step. ``initial(optimizer, group index, device)`` is its first value. Kept either

    - ``where="state"`` (the stochastic-rounding seed): one per (param group, device), in the state
      of the group's first parameter on the device for which ``anchor`` holds, for groups of tensors
      of a dtype for which ``when(values, dtype)`` holds; advanced when such a group stepped; or
    - ``where="group"`` (timm's LAMB ``step``): in the param group dict under ``name`` (so saved with
      the param groups; a number or a tensor elsewhere there, as another implementation saved it, is
      taken as its value and moved), on the device of the group's first parameter, advanced at every
      step whether or not the group has gradients (``anchor`` and ``when`` are not used).
    """

    name: str
    dtype: torch.dtype
    anchor: Callable[[torch.Tensor], bool]
    when: Callable[[Mapping[str, Any], torch.dtype], bool]
    initial: Callable[[Any, int, torch.device], int]
    advance: int = 1
    where: str = "state"


class Rule:
    """Base class of a rule; a subclass sets the class attributes and implements the hooks it needs."""

    #: registry key, and the name the native and Triton kernels dispatch on
    name: str = ""
    #: the optimizer's name in messages
    title: str = ""
    spec: Spec = Spec()
    state: Tuple[object, ...] = ()
    passes: Tuple[Pass, ...] = ()
    #: the rule's Python math, one object per Python backend, each with ``run_pass(index, call)``
    reference: Optional[object] = None
    foreach: Optional[object] = None

    def flags(self, values: Mapping[str, Any], monitor: bool) -> int:
        """The flags the kernels receive: the spec's flag bits, plus any the rule derives."""
        return self.spec.flags(values)

    def kernel_globals(self, call) -> Optional[torch.Tensor]:
        """The global values the compiled kernels (C++, CUDA, Triton) read for one group's pass: by
        default the combining pass's, as the Python backends receive them. A rule whose kernels
        need per-group values computed on the device (LAMB's bias corrections from its step
        count) returns them here as one float32 tensor on the group's device, by tensor ops only."""
        return call.globals

    def check_groups(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """ValueError for param groups that are valid one by one but not together (LAMB's global
        ``max_grad_norm``); ``groups`` hold at least the spec's entries. Checked when a step plan is
        built, before any state is created (a change of a structural entry rebuilds it), and when a
        state dict is loaded."""

    def combine(self, index: int, sums: Sequence[torch.Tensor], groups: Sequence[object]) -> Optional[torch.Tensor]:
        """Global values from every group's sums of pass ``index`` (a pass with ``combine``)."""
        raise NotImplementedError(f"rule {self.name!r} has a combining pass but no combine()")

    def warn(self, optimizer, group_indices: Sequence[int], stacklevel: int) -> None:
        """Warnings about the given param groups of ``optimizer``, at construction (once for all
        groups) and ``add_param_group``; may read values on the host (never runs in a step).
        ``stacklevel`` points at the user's call from here."""

    def summarize(self, record) -> object:
        """Monitoring: per-parameter statistics from one group's :class:`~fromage_fused.engine.monitor.Record`."""
        raise NotImplementedError(f"rule {self.name!r} has no monitoring summary")

    def convert_loaded(self, entry: dict) -> Tuple[dict, Tuple[str, ...]]:
        """One parameter's saved state from a checkpoint of another implementation: ``(entries to
        set, keys of the loaded state to drop)`` (both empty when there is nothing to convert)."""
        return {}, ()

    # -- derived from the declarations ----------------------------------------------------------

    def buffers(self, values: Mapping[str, Any]) -> Tuple[Buffer, ...]:
        return tuple(s for s in self.state if isinstance(s, Buffer) and s.when(values))

    def tensor_scalars(self, values: Mapping[str, Any]) -> Tuple[TensorScalar, ...]:
        return tuple(s for s in self.state if isinstance(s, TensorScalar) and s.when(values))

    def present(self, values: Mapping[str, Any]) -> Tuple[bool, ...]:
        """Which of the buffers and per-tensor scalars the values call for. Part of the step plan's
        structure: a ``when`` may read a per-step value (LARS keeps its momentum buffer only while
        ``momentum`` is not 0), and a change of its answer must rebuild the plan."""
        return tuple(s.when(values) for s in self.state if isinstance(s, (Buffer, TensorScalar)))

    def group_scalars(self) -> Tuple[GroupScalar, ...]:
        return tuple(s for s in self.state if isinstance(s, GroupScalar))

    def fixed_dtypes(self) -> Mapping[str, torch.dtype]:
        """State whose dtype is fixed whatever the parameter's (torch's loading would cast it)."""
        return {s.name: s.dtype for s in self.state if isinstance(s, (TensorScalar, GroupScalar))}

    def __repr__(self) -> str:
        return f"<fromage_fused rule {self.name!r}>"
