"""The persistent step plan of :class:`~fromage_fused.Fromage`.

What ``step()`` derives from the param groups — validation, which parameters have gradients, the
grouping by device and dtype, the backend of each group, the state tensors (``max_norm``, the
stochastic-rounding seed), the local shards of DTensor parameters, real views of complex tensors,
the tensor lists — is built once and reused while it stays valid. Each step revalidates it with
O(1) Python work per param group plus one pass over its tensors (one C++ call when the extension
is loaded, see ``_grad_check.py``) and hands the groups their new gradients. A plan is built again
when:

- the optimizer's generation moved: ``add_param_group``, ``load_state_dict``, unpickling;
- ``param_groups`` or a group's ``params`` list changed (length, order, identity of an entry), or
  ``state`` is another object, or a ``max_norm``/seed entry of the state was replaced;
- a group's ``p_bound``, ``maximize``, ``prefactor`` or ``stochastic_rounding`` changed (``lr`` is
  read and checked every step: schedulers change it);
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
from typing import List, Optional, Tuple

import torch

from . import _training
from . import _grad_check
from ._grad_check import Record, record_pairs
from ._groups import Group, PlanList, adopt_max_norms, group_tensors
from ._overlap import refuse_overlaps
from .distributed import _dtensor_type, local_pairs, local_groups, refuse_flat_parameters, refuse_stochastic_rounding
from .functional import as_float, check_flags, check_lr, check_p_bound

__all__ = ["StepPlan", "build"]

_HYPER = ("p_bound", "maximize", "prefactor", "stochastic_rounding")
_FLAGS = ("maximize", "prefactor", "stochastic_rounding")
_is = operator.is_
_capturing = _training.capturing


def _hyper(pg: dict) -> Tuple:
    # Typed, so that a value that compares equal but means something else (True for 1.0) rebuilds.
    return tuple((type(pg[k]), pg[k]) for k in _HYPER)


class _Pending:
    """State a build creates or moves, stored only once the whole build has validated. (A build
    asks for each state entry once: a parameter belongs to one group, a seed to one group and device.)"""

    def __init__(self, state):
        self.state = state
        self.items: List[Tuple[torch.Tensor, str, torch.Tensor]] = []

    def get(self, p: torch.Tensor, key: str):
        if p not in self.state:
            return None
        return self.state[p].get(key)

    def put(self, p: torch.Tensor, key: str, value: torch.Tensor) -> torch.Tensor:
        self.items.append((p, key, value))
        return value

    def commit(self) -> None:
        for p, key, value in self.items:
            self.state[p][key] = value


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

    def feed(self, grads: List[torch.Tensor]) -> None:
        """Hand the group this step's gradients (real views, contiguous copies where needed)."""
        for j in self.lazy:
            grads[j] = grads[j].resolve_conj().resolve_neg()
        for j in self.complex:
            grads[j] = torch.view_as_real(grads[j])
        for j in self.strided_grads:
            grads[j] = grads[j].contiguous()
        group = self.group
        group.grads = PlanList(grads)  # unchanged between this step's two phases
        if self.views:
            # Viewed anew each step: the plan holds the parameter, not a view of its current shape.
            params, sources = group.params, self.sources
            for j in self.complex:
                params[j] = torch.view_as_real(sources[j])
            writeback = []
            for j in self.strided:
                view = torch.view_as_real(sources[j]) if sources[j].is_complex() else sources[j]
                params[j] = view.contiguous()
                writeback.append((j, view))
            group.writeback = writeback


class _GroupPlan:
    """The plan of one param group: its groups of tensors and what tells whether they still fit."""

    def __init__(self, pg: dict):
        self.pg = pg
        self.hyper = _hyper(pg)
        self.devices: List[torch.device] = []
        self.groups: List[Group] = []
        # Plain tensors: the record of pg["params"]; each group's gradients are one slice of what
        # it returns.
        self.record: Optional[Record] = None
        self.spans: List[Tuple[_Feed, int, int]] = []
        # DTensor parameters with gradients, the record of their local shards, and their groups.
        self.dtensors: List[torch.Tensor] = []
        self.absent_dtensors: List[torch.Tensor] = []
        self.local_record: Optional[Record] = None
        self.local_feeds: List[Tuple[_Feed, List[int]]] = []
        # (the parameters' state dicts, key, the tensors the groups hold): a replaced entry rebuilds.
        self.state_refs: List[Tuple[List[dict], str, List[torch.Tensor]]] = []

    def refresh(self) -> bool:
        """Check this part of the plan and hand its groups this step's gradients; False: rebuild."""
        pg = self.pg
        if _hyper(pg) != self.hyper:
            return False
        lr = pg["lr"]
        check_lr(lr, read_tensor=False)
        for device in self.devices:
            _training.check_capturable_lr(lr, device)
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
        for group in self.groups:
            group.lr = lr
        return True


class StepPlan:
    """Everything one ``step()`` needs, for the optimizer as it was when this was built."""

    def __init__(self, opt, parts: List[_GroupPlan], seeded: List[Group]):
        self.generation = opt._plan_generation
        self.param_groups = opt.param_groups
        self.pgs = list(opt.param_groups)
        self.state = opt.state
        self.state_values = list(opt.state.values())
        self.parts = parts
        self.groups = [g for part in parts for g in part.groups]
        self.seeded = seeded  # the groups that round stochastically, each with its seed

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


def _bound_state(part: _GroupPlan, groups: List[Group], owners: List[torch.Tensor], pending: _Pending,
                 keep: bool) -> None:
    """The max_norm state of bounded groups whose state keys are ``owners[g.indices]``: with ``keep``,
    each group's as one tensor (see ``_groups.adopt_max_norms``; during CUDA graph capture only
    where it already is one, since a tensor made there would live in the graph's memory, so a
    captured step stacks and writes back instead); and the entries a later step checks."""
    for g in groups:
        members = [owners[i] for i in g.indices]
        if keep:
            adopt_max_norms(g, lambda j, view: pending.put(members[j], "max_norm", view), lay_out=not _capturing(g.device))
    part.state_refs.append(([owners[i] for g in groups for i in g.indices], "max_norm",
                            [m for g in groups for m in g.max_norms]))


def build(opt, *, keep: bool = True) -> StepPlan:
    """Validate the param groups and make the plan; raise before any parameter or state changes.

    ``keep=False`` (under torch.compile): no revalidation records, no C++ calls.
    """
    # param_groups before state: under torch.compile the first one read gives the parameters their
    # sources, and a parameter known as a key of the state would guard on its gradient's identity.
    param_groups = opt.param_groups
    pending = _Pending(opt.state)
    parts: List[_GroupPlan] = []
    seeded: List[Group] = []
    dtensor = _dtensor_type()
    # Every tensor the backends will step, its gradient and where it is, for the overlap check.
    stepped_p: List[torch.Tensor] = []
    stepped_g: List[torch.Tensor] = []
    places: List[Tuple[int, int]] = []
    for index, pg in enumerate(param_groups):
        # Groups can be edited after construction (schedulers, users): check what costs no sync.
        lr = pg["lr"]
        check_lr(lr, read_tensor=False)
        check_p_bound(pg["p_bound"])
        check_flags(**{k: pg[k] for k in _FLAGS})
        part = _GroupPlan(pg)
        params = pg["params"]
        order = [i for i, p in enumerate(params) if p.grad is not None]
        with_grad = [params[i] for i in order]
        refuse_flat_parameters(with_grad)
        part.devices = list(dict.fromkeys(p.device for p in with_grad))
        for device in part.devices:
            _training.check_capturable_lr(lr, device)
        bound = pg["p_bound"] is not None
        if dtensor is not None and any(isinstance(params[i], dtensor) for i in order):
            plain_order = [i for i in order if not isinstance(params[i], dtensor)]
            part.dtensors = [params[i] for i in order if isinstance(params[i], dtensor)]
            part.absent_dtensors = [p for p in params if isinstance(p, dtensor) and p.grad is None]
        else:
            plain_order = order
        plain = [params[i] for i in plain_order]
        stepped_p += plain
        stepped_g += [p.grad for p in plain]
        places += [(index, i) for i in plain_order]
        if plain_order or not part.dtensors:
            max_norms = [opt._max_norm(p, p.device, pending) for p in plain] if bound else None
            groups = group_tensors(plain, [p.grad for p in plain], max_norms, opt._backend_for, opt._fallback)
            # The record lists the stepped parameters group by group, so each group's gradients
            # are one slice of what it returns.
            stepped = [plain_order[i] for g in groups for i in g.indices]
            if keep:
                start = 0
                for g in groups:
                    end = start + len(g.indices)
                    part.spans.append((_Feed(g, [plain[i] for i in g.indices], [plain[i].grad for i in g.indices]), start, end))
                    start = end
                part.record = Record(params, stepped, native=not part.dtensors and _grad_check.native_available(params))
            if bound:
                _bound_state(part, groups, plain, pending, keep)
            part.groups += groups
        if part.dtensors:
            if pg["stochastic_rounding"]:
                refuse_stochastic_rounding(part.dtensors)
            local_p, local_g = local_pairs(part.dtensors)
            stepped_p += local_p
            stepped_g += local_g
            places += [(index, i) for i in order if isinstance(params[i], dtensor)]
            max_norms = [opt._max_norm(p, lp.device, pending) for p, lp in zip(part.dtensors, local_p)] if bound else None
            groups = local_groups(part.dtensors, local_p, local_g, max_norms, opt._backend_for, opt._fallback)
            for g in groups:
                g.sources = [part.dtensors[i] for i in g.indices]
            if keep:
                part.local_record = record_pairs(local_p, local_g)
                part.local_feeds = [(_Feed(g, [local_p[i] for i in g.indices], [local_g[i] for i in g.indices]), list(g.indices))
                                    for g in groups]
            if bound:
                _bound_state(part, groups, part.dtensors, pending, keep)
            part.groups += groups
        for g in part.groups:
            g.lr = lr
            g.p_bound = as_float(pg["p_bound"])
            g.maximize = pg["maximize"]
            g.prefactor = pg["prefactor"]
            if pg["stochastic_rounding"] and g.dtype == torch.bfloat16 and g.reduce is None:
                anchor, g.sr_seed = opt._sr_seed(pg, index, g.device, pending)
                seeded.append(g)
                part.state_refs.append(([anchor], "sr_seed", [g.sr_seed]))
        parts.append(part)
    if not torch.compiler.is_compiling():  # (fake tensors have no addresses; the eager steps check)
        refuse_overlaps(stepped_p, stepped_g, lambda k: "parameter {1} of param group {0}".format(*places[k]))
    pending.commit()
    state = opt.state
    for part in parts:
        part.state_refs = [([state[p] for p in entries], key, held) for entries, key, held in part.state_refs]
    return StepPlan(opt, parts, seeded)

