"""``EngineOptimizer``: the ``torch.optim.Optimizer`` of any rule.

A subclass sets ``rule`` and gives the constructor its signature (``Fromage``, ``LARS``...). This
class owns the param groups and their validation, the state that exists from construction, one
backend per device, the persistent step plan, ``step()``, monitoring and ``load_state_dict``.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from torch.optim import Optimizer

from .. import backends as _backends
from . import amp, plan as _plan, rounding
from . import dtypes as _dtypes
from . import state as _state
from . import state_dict as _state_dict
from .execute import execute
from .rule import Rule
from .spec import check_flag

__all__ = ["EngineOptimizer"]


class EngineOptimizer(Optimizer):
    """The optimizer of ``rule`` (a class attribute of the subclass)."""

    rule: Rule
    # GradScaler then skips its unscale pass and sets ``grad_scale`` / ``found_inf`` before step():
    # every pass of every rule reads both on the device.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults: Dict[str, Any], *, backend: str = "auto", seed: Optional[int] = None,
                 monitor: bool = False):
        self.rule.spec.check(defaults)
        check_flag("monitor", monitor)
        #: Keep each step's per-parameter statistics for :meth:`last_stats` (see ``engine/monitor.py``).
        self.monitor = monitor
        self._last_records = None
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a name, got {backend!r}")
        self.backend = _backends.requested_name(backend)
        # Drawn from torch's generator only for a group that rounds stochastically: constructing
        # the optimizer must not shift the random stream of a run that does not use it.
        self._sr_base = None if seed is None else rounding.initial_seed(seed)
        self._device_backends: Dict[torch.device, _backends.Backend] = {}
        self._fallback_backend: Optional[_backends.Backend] = None
        self._plan = None
        self._plan_generation = 0
        # The rule's warnings about the groups are given once for the whole construction.
        self._defer_warnings = True
        super().__init__(params, defaults)
        del self._defer_warnings
        self.rule.warn(self, range(len(self.param_groups)), stacklevel=4)

    # -- param groups and the state that exists from the start -----------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        spec = self.rule.spec
        spec.check({name: param_group.get(name, self.defaults[name]) for name in spec.names})
        params = param_group["params"]
        if not isinstance(params, set):  # the base class refuses sets with its own message
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for p in params:
                # torch's named form: (name, tensor) pairs, as model.named_parameters() yields them.
                t = p[1] if isinstance(p, tuple) and len(p) == 2 else p
                if isinstance(t, torch.Tensor):
                    refusal = _dtypes.refusal(t.dtype, self.rule.title)
                    if refusal is not None:
                        raise ValueError(refusal)
            param_group["params"] = params
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                self._backend_for(p.device)
        except Exception:
            self.param_groups.pop()  # a group whose backend cannot run is not added
            raise
        group = self.param_groups[-1]
        if group.get("stochastic_rounding") and self._sr_base is None:
            self._sr_base = rounding.initial_seed(None)
        self._create_state(group)
        self._invalidate_plan()
        if not getattr(self, "_defer_warnings", False):
            self.rule.warn(self, [len(self.param_groups) - 1], stacklevel=3)

    def _create_state(self, group: Dict[str, Any]) -> None:
        # Unset per-tensor scalar state exists from the start so that torch.distributed.checkpoint's
        # get_state_dict finds state and skips its state-creating step (lr=0, zero gradients),
        # which would set it from the weights of that moment.
        _state.create_tensor_scalars(self.state, group["params"], self.rule.tensor_scalars(group), self.rule.title)

    def _seed_base(self) -> int:
        if self._sr_base is None:  # rounding switched on in a group after construction
            self._sr_base = rounding.initial_seed(None)
        return self._sr_base

    def _invalidate_plan(self) -> None:
        """The next step builds its plan again (anything the plan is derived from may have changed)."""
        self.__dict__["_plan"] = None
        self.__dict__["_plan_generation"] = self.__dict__.get("_plan_generation", 0) + 1

    def __getstate__(self) -> Dict[str, Any]:
        # torch keeps only defaults, state and param_groups; the backend choice and the seed
        # belong to the optimizer too (resolved backends and the plan are not copied: they are
        # found again).
        state = super().__getstate__()
        state.update(backend=self.backend, _sr_base=self._sr_base, monitor=self.monitor)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in self.rule.spec.defaults().items():  # pickled before the key existed
            self.defaults.setdefault(key, value)
        # Groups saved before a hyper-parameter existed, or by another implementation of the
        # optimizer, take this optimizer's defaults, as torch does for its own optimizers' new
        # options. Only the rule's own: torch's __setstate__ has just added its options
        # (differentiable, ...) to the defaults, and copying those into the groups would make a load
        # change state_dict().
        for group in self.param_groups:
            for key in self.rule.spec.names:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
        self.__dict__.setdefault("backend", _backends.AUTO)
        self.__dict__.setdefault("_sr_base", None)
        self.__dict__.setdefault("_device_backends", {})
        self.__dict__.setdefault("_fallback_backend", None)
        self.__dict__.setdefault("monitor", False)
        self.__dict__.setdefault("_last_records", None)
        self._invalidate_plan()

    # -- backends -------------------------------------------------------------------------------------

    def _backend_for(self, device: torch.device) -> _backends.Backend:
        # Resolved once per device, eagerly: the registry's lookups are host work that a compiled
        # or captured step must not repeat (and, for a named backend, construction must reject).
        backend = self._device_backends.get(device)
        if backend is None:
            backend = self._device_backends[device] = _backends.resolve(self.backend, device)
            self._fallback()
        return backend

    def backends(self) -> Dict[torch.device, str]:
        """The backend that steps each device's parameters, by name ({device: name}); why others
        cannot run there: ``fromage_fused.backend_report(device)``."""
        devices = dict.fromkeys(p.device for group in self.param_groups for p in group["params"])
        return {device: self._backend_for(device).name for device in devices}

    def _fallback(self) -> _backends.Backend:
        # The backend of a group whose rule or dtype its device's backend does not step; looked up
        # once, eagerly with the first device's backend: a compiled step builds its plan while it
        # is traced, and the registry's lookup (module discovery) breaks the graph.
        backend = self._fallback_backend
        if backend is None:
            backend = self._fallback_backend = _backends.get(_backends.FALLBACK)
        return backend

    # -- the step ------------------------------------------------------------------------------------------

    def _planned(self):
        if torch.compiler.is_compiling():
            return _plan.build(self, keep=False)
        plan = self._plan
        if plan is not None and plan.refresh(self):
            return plan
        self._plan = None
        plan = _plan.build(self)
        self._plan = plan
        return plan

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one step; return the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = amp.scaler_attributes(self)
        try:
            # Validates every param group (and finds or creates state) before any parameter
            # changes, and before any kernel is enqueued.
            plan = self._planned()
            records = [] if self.monitor else None
            execute(plan.groups, found_inf=found_inf, grad_scale=grad_scale, monitor=records)
            if records is not None or self._last_records is not None:
                # Only when there is something to keep or to drop: torch.compile before 2.7
                # cannot trace an attribute set on the optimizer.
                self._last_records = records
            for counter, by, pg in plan.counters:
                rounding.advance(counter, found_inf, by, pg.get("lr"))
        except BaseException:
            amp.drop_scaler_attributes(self)
            raise
        return loss

    def last_stats(self):
        """Per-parameter statistics of the last step, one entry per group of tensors stepped
        together (device and dtype within a param group), as device tensors (nothing is read on the
        host); what they hold is the rule's. Empty unless ``monitor`` was on."""
        return [r.rule.summarize(r) for r in (self._last_records or [])]

    # -- checkpoints ---------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # Everything the rule reads is checked first (state_dict.py): a load that raises changes
        # nothing. torch casts every state tensor of a floating parameter to the parameter's dtype
        # (bf16, complex...), which would round float32 state of low-precision parameters and
        # destroy an int64 seed: the checked values are put back after the base class has loaded.
        # A checkpoint of another implementation is converted by the rule.
        saved, dropped = _state_dict.check(self.rule, state_dict, self.param_groups, self.defaults)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        # torch's loader puts new state and param_groups objects in place: restoring these undoes it.
        before = {key: self.__dict__[key] for key in ("state", "param_groups")}
        try:
            super().load_state_dict(state_dict)
            params = [p for g in self.param_groups for p in g["params"]]
            for pid, p in zip(saved_ids, params):
                if pid in saved:
                    self._restore(p, saved[pid], dropped.get(pid, ()))
            for group in self.param_groups:
                self._create_state(group)  # e.g. a bounded group whose checkpoint had no bound yet
        except BaseException:
            self.__dict__.update(before)
            raise
        finally:
            self._invalidate_plan()

    def _restore(self, p: torch.Tensor, entry: Dict[str, Any], dropped) -> None:
        state = self.state[p]
        fixed = self.rule.fixed_dtypes()
        for key in dropped:
            state.pop(key, None)
        for key, value in entry.items():
            if key in fixed:
                state[key] = torch.tensor(value, dtype=fixed[key], device=_state.local_device(p))
            elif isinstance(value, torch.Tensor):
                state[key] = copy.deepcopy(value.detach()).to(device=p.device, dtype=_dtypes.buffer_dtype(p.dtype))
