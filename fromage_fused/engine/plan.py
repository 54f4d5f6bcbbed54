"""The persistent step plan of an engine optimizer.

What ``step()`` derives from the param groups — validation, which parameters have gradients, the
grouping by device and dtype, the backend of each group, the rule's state tensors, the local
shards of DTensor parameters, real views of complex tensors, the tensor lists — is built once and
reused while it stays valid. Each step revalidates it with O(1) Python work per param group plus
one pass over its tensors (one C++ call when the extension is loaded, see ``plan_record.py``),
reads the per-step hyper-parameters and hands the groups their new gradients. A plan is built
again when:

- the optimizer's generation moved: ``add_param_group``, ``load_state_dict``, unpickling;
- ``param_groups`` or a group's ``params`` list changed (length, order, identity of an entry), or
  ``state`` is another object, or a state entry the plan holds was replaced;
- a structural hyper-parameter of a group changed (the rule's spec says which; per-step values
  such as ``lr`` are read and checked every step: schedulers change them);
- a gradient appeared, disappeared, or changed dtype, device, shape, layout or contiguity; a
  parameter changed address, shape or strides (``p.data = ...``, also on the same storage,
  ``module.to(...)``);
- a DTensor parameter's local shard is another tensor (FSDP2 resharding, ``reset_sharded_param``).

Building validates everything and creates missing state only after all of it passed, so a step
that raises has changed no parameter and no state. Under ``torch.compile`` no plan is kept: the
step is traced through a fresh build (tracing runs it once; the graph keeps none of its host work).
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import capture, plan_record
from . import state as _state
from .distributed import dtensor_type, local_groups, local_pairs, refuse_flat_parameters, refuse_stochastic_rounding
from .groups import Group, PlanList, group_tensors, lay_out
from .overlap import refuse_overlaps
from .spec import as_step_value
from .plan_record import PlanRecord, record_pairs

__all__ = ["StepPlan", "build"]

_is = operator.is_


class _Feed:
    """How one group gets its tensors each step from the parameters it was built for."""

    def __init__(self, group: Group, sources: List[torch.Tensor], grads: List[torch.Tensor]):
        self.group = group
        self.sources = sources  # the parameters (or DTensor local shards) as their owners hold them
        dense = group.backend.dense_only
        self.complex = [j for j, t in enumerate(sources) if t.is_complex()]
        self.strided = [j for j, t in enumerate(sources) if dense and not t.is_contiguous()]
        # Lazily conjugated or negated gradients are materialised for every backend.
        self.lazy = [j for j, g in enumerate(grads) if g.is_conj() or g.is_neg()]
        self.strided_grads = [j for j, g in enumerate(grads) if dense and not g.is_contiguous()]
        self.views = bool(self.complex or self.strided)
        if not self.views:  # the list and its tensors stay as they are while the plan holds
            group.params = PlanList(group.params)
        # Buffers are contiguous state tensors (real views of complex ones), stable while the plan holds.
        for name in group.buffers:
            group.buffers[name] = PlanList(group.buffers[name])

    def feed(self, grads: List[torch.Tensor]) -> None:
        """Hand the group this step's gradients (real views, contiguous copies where needed)."""
        for j in self.lazy:
            grads[j] = grads[j].resolve_conj().resolve_neg()
        for j in self.complex:
            grads[j] = torch.view_as_real(grads[j])
        for j in self.strided_grads:
            grads[j] = grads[j].contiguous()
        group = self.group
        group.grads = PlanList(grads)  # unchanged between this step's passes
        if self.views:
            # Viewed anew each step: the plan holds the parameter, not a view of its current shape.
            params, sources = group.params, self.sources
            for j in self.complex:
                params[j] = torch.view_as_real(sources[j])
            writeback = []
            for j in self.strided:
                view = torch.view_as_real(sources[j]) if sources[j].is_complex() else sources[j]
                params[j] = view.contiguous()
                writeback.append(("p", j, view))
            group.writeback = writeback


def _structure(rule, pg: dict) -> Tuple:
    """What the plan of a param group is built for: the spec's structural entries, and which state
    the group's values call for (``Rule.present``)."""
    return rule.spec.structure(pg), rule.present(pg)


class _GroupPlan:
    """The plan of one param group: its groups of tensors and what tells whether they still fit."""

    def __init__(self, rule, pg: dict):
        self.rule = rule
        self.pg = pg
        self.structure = _structure(rule, pg)
        self.devices: List[torch.device] = []
        self.groups: List[Group] = []
        # Plain tensors: the record of pg["params"]; each group's gradients are one slice of what
        # it returns.
        self.record: Optional[PlanRecord] = None
        self.spans: List[Tuple[_Feed, int, int]] = []
        # DTensor parameters with gradients, the record of their local shards, and their groups.
        self.dtensors: List[torch.Tensor] = []
        self.absent_dtensors: List[torch.Tensor] = []
        self.local_record: Optional[PlanRecord] = None
        self.local_feeds: List[Tuple[_Feed, List[int]]] = []
        # (the parameters' state dicts, key, the tensors the groups hold): a replaced entry rebuilds.
        self.state_refs: List[Tuple[List, str, List[torch.Tensor]]] = []
        # (key, tensor) of per-group scalars kept in the param group itself
        self.group_refs: List[Tuple[str, torch.Tensor]] = []

    def refresh(self) -> bool:
        """Check this part of the plan and hand its groups this step's gradients and values; False: rebuild."""
        pg = self.pg
        spec = self.rule.spec
        if _structure(self.rule, pg) != self.structure:
            return False
        fresh = _per_step_values(spec, pg, self.devices, self.rule.title)
        if self.record is not None:
            grads = self.record.grads(pg["params"])
            if grads is None:
                return False
            for feed, start, end in self.spans:
                feed.feed(grads[start:end])
        if self.dtensors or self.absent_dtensors:
            if any(p.grad is None for p in self.dtensors) or any(p.grad is not None for p in self.absent_dtensors):
                return False
            local_p, local_g = local_pairs(self.dtensors)
            if not self.local_record.pairs(local_p, local_g):
                return False
            for feed, members in self.local_feeds:
                feed.feed([local_g[i] for i in members])
        for entries, key, held in self.state_refs:
            try:
                if not all(map(_is, map(operator.itemgetter(key), entries), held)):
                    return False
            except KeyError:
                return False
        for key, held in self.group_refs:
            if pg.get(key) is not held:
                return False
        for group in self.groups:
            group.values.update(fresh)
        return True


def _per_step_values(spec, pg: dict, devices: Sequence[torch.device], title: str) -> Dict[str, object]:
    """The group's per-step values, checked without reading a tensor (and, under capture, refused
    as Python numbers where the spec allows a tensor: a number would be baked into the graph)."""
    fresh = {}
    for name in spec.per_step:
        value = pg[name]
        spec.by_name[name].check(name, value, False)
        if spec.tensor_allowed(name):
            for device in devices:
                capture.check_capturable_lr(value, device, title)
        fresh[name] = value
    return fresh


class StepPlan:
    """Everything one ``step()`` needs, for the optimizer as it was when this was built."""

    def __init__(self, opt, parts: List[_GroupPlan], counters: List[Tuple[torch.Tensor, int, dict]]):
        self.generation = opt._plan_generation
        self.param_groups = opt.param_groups
        self.pgs = list(opt.param_groups)
        self.state = opt.state
        self.state_values = list(opt.state.values())
        self.parts = parts
        self.groups = [g for part in parts for g in part.groups]
        #: per-group scalars and how much each applied step adds to them (each once)
        self.counters = counters

    def refresh(self, opt) -> bool:
        """Revalidate for this step (new gradients); False: the plan must be built again."""
        if (
            opt._plan_generation != self.generation
            or opt.param_groups is not self.param_groups
            or len(opt.param_groups) != len(self.pgs)
            or not all(map(_is, opt.param_groups, self.pgs))
            or opt.state is not self.state
            # Each parameter's state dict is where it was (none replaced, added or removed); the
            # entries the plan holds are checked per key below. (By position: hashing a tensor
            # key is a Python call per parameter.)
            or len(opt.state) != len(self.state_values)
            or not all(map(_is, opt.state.values(), self.state_values))
        ):
            return False
        for part in self.parts:
            if not part.refresh():
                return False
        return True


# -- building -----------------------------------------------------------------------------------------

class _Build:
    """What one build shares across its param groups."""

    def __init__(self, opt, keep: bool):
        self.opt = opt
        self.rule = opt.rule
        self.title = opt.rule.title
        self.keep = keep
        self.pending = _state.Pending(opt.state)
        self.counters: List[Tuple[torch.Tensor, int, dict]] = []
        # Every tensor the backends will step, its gradient and where it is, for the overlap check.
        self.stepped_p: List[torch.Tensor] = []
        self.stepped_g: List[torch.Tensor] = []
        self.places: List[Tuple[int, int]] = []

    def counter(self, value: torch.Tensor, advance: int, pg: dict) -> None:
        """A per-group scalar to advance after the step, once however many groups share it (found
        by identity: dynamo in torch 2.6 cannot take the id() of a tensor made while it traces)."""
        if not any(v is value for v, _, _ in self.counters):
            self.counters.append((value, advance, pg))

    def stepped(self, index: int, positions: Sequence[int], params, grads) -> None:
        self.stepped_p += params
        self.stepped_g += grads
        self.places += [(index, i) for i in positions]

    def state_lists(self, part: _GroupPlan, values, owners: Sequence[torch.Tensor], locals_: Sequence[torch.Tensor]):
        """``(scalars, buffers)`` by name for parameters ``owners`` whose values live in ``locals_``
        (the buffers as the state holds them; the entries a later step checks are noted)."""
        rule, pending, title = self.rule, self.pending, self.title
        scalars = {s.name: [_state.tensor_scalar(self.opt.state, p, s, lp.device, pending, title)
                            for p, lp in zip(owners, locals_)]
                   for s in rule.tensor_scalars(values)}
        buffers = {b.name: [_state.buffer(p, b, pending, title) for p in owners] for b in rule.buffers(values)}
        for name, held in buffers.items():
            part.state_refs.append((list(owners), name, held))
        return scalars, buffers

    def lay_out(self, part: _GroupPlan, groups: List[Group], owners: Sequence[torch.Tensor]) -> None:
        """Each group's per-tensor scalar state as one tensor (during CUDA graph capture only where it
        already is one, since a tensor made there would live in the graph's memory: a captured step
        stacks and writes back instead), and the state entries a later step checks."""
        pending = self.pending
        for g in groups:
            members = [owners[i] for i in g.indices]
            for name, scalars in g.scalars.items():
                if self.keep:
                    lay_out(scalars, lambda j, view, name=name: pending.put(members[j], name, view),
                            new=not capture.capturing(g.device))
                part.state_refs.append((members, name, list(scalars.entries)))


def _plain_part(b: _Build, part: _GroupPlan, index: int, params, plain_order, values) -> None:
    plain = [params[i] for i in plain_order]
    b.stepped(index, plain_order, plain, [p.grad for p in plain])
    scalars, buffers = b.state_lists(part, values, plain, plain)
    opt = b.opt
    groups = group_tensors(b.rule, plain, [p.grad for p in plain], opt._backend_for, opt._fallback,
                           scalars=scalars, buffers=buffers)
    if b.keep:
        # The record lists the stepped parameters group by group, so each group's gradients are one
        # slice of what it returns.
        stepped = [plain_order[i] for g in groups for i in g.indices]
        start = 0
        for g in groups:
            end = start + len(g.indices)
            part.spans.append((_Feed(g, [plain[i] for i in g.indices], [plain[i].grad for i in g.indices]), start, end))
            start = end
        part.record = PlanRecord(params, stepped,
                                 native=not part.dtensors and plan_record.native_available(params))
    b.lay_out(part, groups, plain)
    part.groups += groups


def _dtensor_part(b: _Build, part: _GroupPlan, index: int, values, positions) -> None:
    if values.get("stochastic_rounding"):
        refuse_stochastic_rounding(part.dtensors)
    local_p, local_g = local_pairs(part.dtensors)
    b.stepped(index, positions, local_p, local_g)
    scalars, buffers = b.state_lists(part, values, part.dtensors, local_p)
    buffers = {name: [t.to_local() if hasattr(t, "to_local") else t for t in entries]
               for name, entries in buffers.items()}
    opt = b.opt
    groups = local_groups(b.rule, part.dtensors, local_p, local_g, opt._backend_for, opt._fallback,
                          scalars=scalars, buffers=buffers)
    for g in groups:
        g.sources = [part.dtensors[i] for i in g.indices]
    if b.keep:
        part.local_record = record_pairs(local_p, local_g)
        part.local_feeds = [(_Feed(g, [local_p[i] for i in g.indices], [local_g[i] for i in g.indices]),
                             list(g.indices)) for g in groups]
    b.lay_out(part, groups, part.dtensors)
    part.groups += groups


def _counters(b: _Build, part: _GroupPlan, index: int, values) -> None:
    """Per-group scalars (the stochastic-rounding seed, a step count) of the part's groups."""
    params = part.pg["params"]
    made = {}  # one per (param group, device), whichever groups of it share a device
    for spec in b.rule.group_scalars():
        if spec.where == "group":
            value = _state.group_kept_scalar(b.opt, part.pg, spec, index, b.pending, b.title)
            if value is not None:
                b.counter(value, spec.advance, part.pg)
                part.group_refs.append((spec.name, value))
                for g in part.groups:
                    g.counters[spec.name] = value
            continue
        for g in part.groups:
            if not spec.when(values, g.dtype):
                continue
            key = (spec.name, g.device)
            if key not in made:
                made[key] = _state.group_scalar(b.opt, params, spec, index, g.device, b.pending, b.title)
                anchor, value = made[key]
                b.counter(value, spec.advance, part.pg)
                part.state_refs.append(([anchor], spec.name, [value]))
            g.counters[spec.name] = made[key][1]


def _part(b: _Build, index: int, pg: dict, dtensor) -> _GroupPlan:
    rule = b.rule
    # Groups can be edited after construction (schedulers, users): check what costs no sync.
    rule.spec.check(pg, read_tensor=False)
    values = {name: pg[name] for name in rule.spec.names}
    part = _GroupPlan(rule, pg)
    params = pg["params"]
    order = [i for i, p in enumerate(params) if p.grad is not None]
    refuse_flat_parameters([params[i] for i in order], b.title)
    part.devices = list(dict.fromkeys(params[i].device for i in order))
    _per_step_values(rule.spec, pg, part.devices, b.title)
    if dtensor is not None and any(isinstance(params[i], dtensor) for i in order):
        plain_order = [i for i in order if not isinstance(params[i], dtensor)]
        part.dtensors = [params[i] for i in order if isinstance(params[i], dtensor)]
        part.absent_dtensors = [p for p in params if isinstance(p, dtensor) and p.grad is None]
    else:
        plain_order = order
    if plain_order or not part.dtensors:
        _plain_part(b, part, index, params, plain_order, values)
    if part.dtensors:
        _dtensor_part(b, part, index, values, [i for i in order if isinstance(params[i], dtensor)])
    # (a Fraction or a numpy scalar the checks accepted is stepped as its float)
    stepped_values = {name: as_step_value(v) for name, v in values.items()}
    for g in part.groups:
        g.values = dict(stepped_values)
    _counters(b, part, index, values)
    return part


def build(opt, *, keep: bool = True) -> StepPlan:
    """Validate the param groups and make the plan; raise before any parameter or state changes.

    ``keep=False`` (under torch.compile): no revalidation records, no C++ calls.
    """
    # param_groups before state: under torch.compile the first one read gives the parameters their
    # sources, and a parameter known as a key of the state would guard on its gradient's identity.
    param_groups = opt.param_groups
    b = _Build(opt, keep)
    dtensor = dtensor_type()
    parts = [_part(b, index, pg, dtensor) for index, pg in enumerate(param_groups)]
    b.rule.check_groups(param_groups)
    if not torch.compiler.is_compiling():  # (fake tensors have no addresses; the eager steps check)
        places = b.places
        refuse_overlaps(b.stepped_p, b.stepped_g, lambda k: "parameter {1} of param group {0}".format(*places[k]))
    b.pending.commit()
    state = opt.state
    for part in parts:
        part.state_refs = [([state[p] for p in entries], key, held) for entries, key, held in part.state_refs]
    return StepPlan(opt, parts, b.counters)
