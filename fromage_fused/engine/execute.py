"""Running a step: a rule's passes over groups of tensors.

For each pass, every group's backend runs it (:class:`Call` is everything a backend receives);
then, if the pass reduced per-tensor sums, the sums of sharded tensors are summed over their ranks
(one all-reduce per process group, ``engine/distributed.py``), a caller's ``reduce_sums`` may
replace them, and a combining pass turns every group's sums into the global values of the later
passes. After the last pass, stacked copies of per-tensor scalar state and contiguous copies of
strided tensors are written back.

A pass whose sums nothing combines or reduces, followed by one that returns no sums (so it reads
only each tensor's own sums of the first), runs together with it where the group's backend can
(``Backend.run_pair``: on CPU, tensor block by tensor block while each block is in cache), in an
eager step without a caller's ``reduce_sums``, sharded tensors or stochastic rounding.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .dtypes import accumulate_dtype
from .groups import Group
from .spec import applied

__all__ = ["Call", "execute", "run_pass", "prepare", "pairable"]


class Call:
    """What a backend's ``run_pass`` receives for one group and one pass.

    ``lists``: the pass's tensor lists, in the order of ``Pass.lists`` (the written ones first);
    ``sums``: the previous pass's ``[n, k]`` sums (whole tensors), or None; ``hyper``: the packed
    hyper-parameters (``Spec.pack``) in the accumulation dtype on the device; ``flags``: the rule's
    flag bits; ``values``: the hyper-parameters as the param group holds them (Python numbers, for
    backends that compute on the host); ``scalars``: per-tensor scalar state by name, each one
    contiguous ``[n]`` tensor read and written in place (``scalar_list``: those the group's values
    use, in the rule's order); ``seed``: the stochastic-rounding seed (a
    0-d int64 tensor) or None; ``counters``: the per-group scalars by name; ``globals``: the global
    values of the last combining pass before this one, or None; ``found_inf``, ``grad_scale``: None
    or 0-d float32 tensors; ``memo``: what a rule derives once per step and group for several passes
    (LAMB's kernel globals); ``pairs``: the group may run two passes together (``pairable``),
    ``ran``: the index of a pass that already ran with the one before it, or -1.
    """

    __slots__ = ("group", "rule", "index", "lists", "writes", "n", "device", "dtype", "sums", "hyper", "flags",
                 "values", "scalars", "scalar_list", "seed", "counters", "globals", "found_inf", "grad_scale",
                 "memo", "pairs", "ran", "_stacked")

    def __repr__(self) -> str:
        return f"<Call {self.rule.name} pass {self.index} of {self.n} {self.dtype} tensors on {self.device}>"


def _device_scalar(value, device: torch.device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
    return torch.full((), value, device=device, dtype=torch.float32)


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A new 1-d tensor holding the values of the 0-d ``tensors``. Traced, as copies into a new
    tensor: inductor turns ``stack`` of one view of an input into a read at the storage's start
    (another parameter's state when the view is not the first of its storage)."""
    if not torch.compiler.is_compiling():
        return torch.stack(list(tensors))
    out = torch.empty(len(tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    torch._foreach_copy_(list(out.unbind()), list(tensors))
    return out


def prepare(group: Group, found_inf=None, grad_scale=None, *, monitor: bool = False) -> Call:
    """The parts of a :class:`Call` that stay the same through the passes of one step."""
    rule = group.rule
    call = Call()
    call.group, call.rule = group, rule
    call.n, call.device, call.dtype = len(group.params), group.device, group.dtype
    values = group.values
    call.values = values
    call.hyper = rule.spec.pack(values, group.device, accumulate_dtype(group.dtype), group.packed)
    call.flags = rule.flags(values, monitor)
    scalars, stacked = {}, []
    for name, s in group.scalars.items():
        if s.laid is not None:
            scalars[name] = s.laid
        else:
            # Not laid out (the functional API, a compiled or captured step): a stacked copy,
            # written back to the parameters' state tensors after the step.
            scalars[name] = _stacked(s.entries)
            stacked.append((s.entries, scalars[name]))
    call.scalars, call._stacked = scalars, stacked
    # The per-tensor scalars in use, in the rule's order: what the kernels take.
    call.scalar_list = [scalars[s.name] for s in rule.tensor_scalars(values) if s.name in scalars]
    # Per-group scalars on the group's device (one kept in a param group lives on its first device).
    call.counters = {k: v if v.device == group.device else v.to(group.device, non_blocking=True)
                     for k, v in group.counters.items()} if group.counters else group.counters
    seed = call.counters.get("sr_seed") if group.dtype == torch.bfloat16 else None
    call.seed = None if seed is None else seed.reshape(())
    call.found_inf = _device_scalar(found_inf, group.device)
    call.grad_scale = _device_scalar(grad_scale, group.device)
    call.sums = call.globals = None
    call.memo = {}
    call.pairs, call.ran = False, -1
    return call


def pairable(rule, index: int, flags: int) -> bool:
    """Pass ``index`` may run with the next one under ``flags``: it has sums that no combining pass
    takes, and the next one runs and has no sums of its own."""
    passes = rule.passes
    if index + 1 >= len(passes):
        return False
    this, following = passes[index], passes[index + 1]
    return bool(this.sums_for(flags)) and not this.combine and following.runs(flags) and not following.sums_for(flags)


def _run(call: Call, index: int) -> Optional[torch.Tensor]:
    if call.ran == index:
        return None  # it ran with the pass before it
    group = call.group
    spec = call.rule.passes[index]
    call.index = index
    names, call.writes = spec.lists_for(call.flags)
    call.lists = group.lists(names)
    if not spec.runs(call.flags):
        # Nothing reads this pass's sums under these flags: zeros, without a look at the data.
        count = spec.sums_for(call.flags)
        return torch.zeros(call.n, count, dtype=accumulate_dtype(call.dtype), device=call.device) if count else None
    if call.pairs and pairable(call.rule, index, call.flags):
        call.ran = index + 1
        return group.backend.run_pair(call.rule, index, call)
    return group.backend.run_pass(call.rule, index, call)


def _set_after(call: Call) -> None:
    """Per-tensor scalars the engine sets after an applied step (``TensorScalar.after``)."""
    for s in call.rule.tensor_scalars(call.values):
        if s.after is None or s.name not in call.scalars:
            continue
        target = call.scalars[s.name]
        keep = applied(call.found_inf, call.values.get("lr"), target.device)
        if keep is None:
            target.fill_(s.after)
        else:
            target.copy_(torch.where(keep, torch.full_like(target, s.after), target))


def _finish(call: Call) -> None:
    _set_after(call)
    for entries, stacked in call._stacked:
        torch._foreach_copy_(list(entries), list(stacked.unbind()))
    group = call.group
    for name, i, original in group.writeback:
        result = group.params[i] if name == "p" else group.buffers[name][i]
        original.copy_(torch.view_as_complex(result) if original.is_complex() and not result.is_complex() else result)


def _as(sums: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # A caller's reduce_sums may hand back another dtype or layout; backends get what they gave.
    return sums.to(device=like.device, dtype=like.dtype).contiguous()


def _whole(calls: Sequence[Call], sums: List[torch.Tensor],
           reduce_sums: Optional[Callable[[torch.Tensor, Group], torch.Tensor]]) -> List[torch.Tensor]:
    """Sums of whole tensors: shards' sums added over their ranks (one all-reduce per process
    group), then the caller's ``reduce_sums``."""
    pending: Dict[object, List[int]] = {}
    for k, call in enumerate(calls):
        if call.group.reduce is not None:
            pending.setdefault(call.group.reduce, []).append(k)
    if pending:
        from .distributed import all_reduce_sums

        for (process_group, device_type), members in pending.items():
            reduced = all_reduce_sums([sums[k] for k in members], process_group, device_type)
            for k, s in zip(members, reduced):
                sums[k] = s
    if reduce_sums is not None:
        sums = [_as(reduce_sums(s, call.group), s) for s, call in zip(sums, calls)]
    return sums


def execute(
    groups: Sequence[Group],
    *,
    found_inf: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    reduce_sums: Optional[Callable[[torch.Tensor, Group], torch.Tensor]] = None,
    monitor: Optional[list] = None,
) -> None:
    """Step ``groups`` (all of one rule): each pass over every group, then the next.

    ``reduce_sums(sums, group)``, when given, replaces each group's sums of whole tensors before
    the next pass. ``monitor``: a list that receives one ``engine.monitor.Record`` per group.
    """
    if not groups:
        return
    rule = groups[0].rule
    calls = [prepare(g, found_inf, grad_scale, monitor=monitor is not None) for g in groups]
    if reduce_sums is None and not torch.compiler.is_compiling():
        for call in calls:
            call.pairs = call.group.reduce is None and call.seed is None and call.group.backend.pairs(call)
    history: List[List[Any]] = [[] for _ in calls]
    for index, spec in enumerate(rule.passes):
        sums = [_run(call, index) for call in calls]
        # the groups whose flags ask this pass for sums (all or none, but for a pass with ``summed``)
        summed = [k for k, call in enumerate(calls) if spec.sums_for(call.flags)]
        if summed:
            reduced = _whole([calls[k] for k in summed], [sums[k] for k in summed], reduce_sums)
            globals_ = rule.combine(index, reduced, [calls[k].group for k in summed]) if spec.combine else None
            for k, s in zip(summed, reduced):
                calls[k].sums = s
                if spec.combine:  # (kept for every later pass: LAMB's clip divisor is read by two)
                    calls[k].globals = globals_
                history[k].append(s)
    for call in calls:
        _finish(call)
    if monitor is not None:
        from .monitor import record

        for call, sums in zip(calls, history):
            monitor.append(record(call, sums))


def run_pass(group: Group, index: int, *, sums: Optional[torch.Tensor] = None, globals_=None,
             found_inf=None, grad_scale=None, monitor: bool = False) -> Optional[torch.Tensor]:
    """One pass of one group (the functional APIs' phases): ``sums`` are the previous pass's. After
    the last pass, stacked and contiguous copies are written back."""
    call = prepare(group, found_inf, grad_scale, monitor=monitor)
    call.sums, call.globals = sums, globals_
    out = _run(call, index)
    if index == len(group.rule.passes) - 1:
        _finish(call)
    return out
