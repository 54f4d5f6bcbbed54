"""``Fromage``: the torch.optim.Optimizer users construct. It owns hyper-parameters and state."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.optim import Optimizer

from . import _param_groups, _state_dict, _step_plan, _training
from . import backends as _backends
from ._groups import FALLBACK, dtype_refusal, execute
from .functional import UNSET_MAX_NORM, check_flags as _check_flags, check_lr as _check_lr, check_p_bound as _check_p_bound

__all__ = ["Fromage"]


class Fromage(Optimizer):
    r"""Fromage (Frobenius matched gradient descent; Bernstein et al., NeurIPS 2020).

    For each parameter ``p`` with gradient ``g``::

        p <- (p - lr * ||p||/||g|| * g) / sqrt(1 + lr^2)    if ||p|| > 0 and ||g|| > 0
        p <- (p - lr * g) / sqrt(1 + lr^2)                  otherwise
        p <- p * max_norm / ||p||                           if p_bound is set and ||p|| > max_norm

    where ``max_norm = p_bound * ||p||`` is taken once, before the update of the first step in
    which ``p`` has a gradient.

    Args:
        params: parameters or parameter groups.
        lr: relative change of each tensor per step (a float or a 0-d tensor; 0.01 works across
            tasks, 0.001 for fine-tuning).
        p_bound: if set, each tensor's norm is kept at most ``p_bound`` times its initial norm.
        maximize: ascend instead of descend.
        prefactor: divide by ``sqrt(1 + lr^2)`` (Fromage). ``False`` drops it, which gives the
            paper's LARS baseline (eq. 5), whose weight norms grow step after step.
        backend: ``"auto"`` (fastest that works here; ``$FROMAGE_FUSED_BACKEND`` overrides it) or
            one of :func:`fromage_fused.available_backends`; resolved for each device when the
            optimizer first sees a parameter there (at construction), not at every step.
        stochastic_rounding: round bf16 parameters stochastically (unbiased) instead of to
            nearest, so that updates smaller than half a bf16 ulp survive in expectation.
        seed: seed of the stochastic rounding (default: drawn from torch's generator, only when a
            group rounds stochastically, so that other runs' random streams stay as they were).
        monitor: keep per-parameter statistics of each step, read with :meth:`last_stats`
            (``opt.monitor`` switches it at any time; costs nothing when off).
        weight_decay: accepted (and saved in the param groups) for the training frameworks that
            pass it, but Fromage has no weight decay: a non-zero value is ignored with a warning.
            The ``1/sqrt(1 + lr^2)`` prefactor already shrinks every tensor by a factor of about
            ``1 - lr^2/2`` per step, and ``p_bound`` caps norms.

    A ``p_bound`` group that holds an all-zero tensor (which would stay zero for ever) and a
    non-zero ``weight_decay`` each give one warning at construction or ``add_param_group``;
    ``fromage_fused.param_groups`` builds groups that avoid the first.

    Works with ``torch.amp.GradScaler`` without an unscale pass, with CUDA-graph capture (``lr``
    as a device tensor, state created by eager warm-up steps) and with ``torch.compile``.
    """

    # GradScaler then skips its unscale pass and sets ``grad_scale`` / ``found_inf`` before step():
    # the update is invariant to the gradient's scale except in the zero-norm fallback.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0.01, p_bound: Optional[float] = None, *, maximize: bool = False, prefactor: bool = True,
                 backend: str = "auto", stochastic_rounding: bool = False, seed: Optional[int] = None,
                 monitor: bool = False, weight_decay: float = 0.0):
        _check_lr(lr)
        _check_p_bound(p_bound)
        _param_groups.check_weight_decay(weight_decay)
        _check_flags(monitor=monitor)
        #: Keep each step's per-parameter statistics for :meth:`last_stats` (see ``_monitor.py``).
        self.monitor = monitor
        self._last_records = None
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a name, got {backend!r}")
        self.backend = _backends.requested_name(backend)
        # Drawn from torch's generator only for a group that rounds stochastically: constructing
        # the optimizer must not shift the random stream of a run that does not use it.
        self._sr_base = None if seed is None else _training.initial_seed(seed)
        self._device_backends: Dict[torch.device, _backends.Backend] = {}
        self._plan = None
        self._plan_generation = 0
        defaults = dict(lr=lr, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
                        stochastic_rounding=stochastic_rounding, weight_decay=weight_decay)
        # The groups' traps are told once for the whole construction, not once per group.
        self._defer_trap_warnings = True
        super().__init__(params, defaults)
        del self._defer_trap_warnings
        _param_groups.warn_traps(self, range(len(self.param_groups)), stacklevel=3)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if "lr" in param_group:
            _check_lr(param_group["lr"])
        if "p_bound" in param_group:
            _check_p_bound(param_group["p_bound"])
        if "weight_decay" in param_group:
            _param_groups.check_weight_decay(param_group["weight_decay"])
        _check_flags(**{flag: param_group.get(flag, self.defaults[flag]) for flag in _FLAGS})
        rounding = param_group.get("stochastic_rounding", self.defaults["stochastic_rounding"])
        params = param_group["params"]
        if not isinstance(params, set):  # the base class refuses sets with its own message
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for p in params:
                # torch's named form: (name, tensor) pairs, as model.named_parameters() yields them.
                t = p[1] if isinstance(p, tuple) and len(p) == 2 else p
                if isinstance(t, torch.Tensor):
                    refusal = dtype_refusal(t.dtype)
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
        if rounding and self._sr_base is None:
            self._sr_base = _training.initial_seed(None)
        self._create_max_norms(self.param_groups[-1])
        self._invalidate_plan()
        if not getattr(self, "_defer_trap_warnings", False):
            _param_groups.warn_traps(self, [len(self.param_groups) - 1], stacklevel=3)

    def _create_max_norms(self, group: Dict[str, Any]) -> None:
        # Unset max_norm state exists from the start so that torch.distributed.checkpoint's
        # get_state_dict finds state and skips its state-creating step (lr=0, zero gradients),
        # which would set max_norm from the weights of that moment and clamp them to it.
        # New ones are views of one tensor per device, in parameter order: what a step hands its
        # backend as one argument when the group steps as one (see _groups.adopt_max_norms).
        if group["p_bound"] is None:
            return
        new: Dict[torch.device, List[torch.Tensor]] = {}
        for p in group["params"]:
            if self.state.get(p, {}).get("max_norm") is None:
                new.setdefault(_local_device(p), []).append(p)
            else:
                self.state[p]["max_norm"] = self._max_norm(p, _local_device(p))
        for device, params in new.items():
            _training.refuse_new_state("max_norm", device)
            buffer = torch.full((len(params),), UNSET_MAX_NORM, dtype=torch.float32, device=device)
            for p, view in zip(params, buffer.unbind()):
                self.state[p]["max_norm"] = view

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
        self.defaults.setdefault("weight_decay", 0.0)  # pickled before the key existed
        # Groups saved before a hyper-parameter existed, or by another implementation of Fromage,
        # take this optimizer's defaults, as torch does for its own optimizers' new options. Only
        # Fromage's own: torch's __setstate__ has just added its options (differentiable, ...) to
        # the defaults, and copying those into the groups would make a load change state_dict().
        for group in self.param_groups:
            for key in _HYPER_PARAMETERS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
        self.__dict__.setdefault("backend", _backends.AUTO)
        self.__dict__.setdefault("_sr_base", None)
        self.__dict__.setdefault("_device_backends", {})
        self.__dict__.setdefault("monitor", False)
        self.__dict__.setdefault("_last_records", None)
        self._invalidate_plan()

    def _backend_for(self, device: torch.device) -> _backends.Backend:
        # Resolved once per device, eagerly: the registry's lookups are host work that a compiled
        # or captured step must not repeat (and, for a named backend, construction must reject).
        backend = self._device_backends.get(device)
        if backend is None:
            backend = self._device_backends[device] = _backends.resolve(self.backend, device)
        return backend

    def backends(self) -> Dict[torch.device, str]:
        """The backend that steps each device's parameters, by name ({device: name}); why others
        cannot run there: ``fromage_fused.backend_report(device)``."""
        devices = dict.fromkeys(p.device for group in self.param_groups for p in group["params"])
        return {device: self._backend_for(device).name for device in devices}

    @staticmethod
    def _fallback() -> _backends.Backend:
        return _backends.get(FALLBACK)

    def _max_norm(self, p: torch.Tensor, device: torch.device, pending=None) -> torch.Tensor:
        """The max_norm state of ``p``, on ``device`` (its local shard's for a DTensor). Created
        unset on the host without reading any value (the step sets it); one that stayed behind
        when the model moved is moved. With ``pending``, a new or moved tensor is stored there, to
        reach the state only when the whole step has validated."""
        current = pending.get(p, "max_norm") if pending is not None else self.state.get(p, {}).get("max_norm")
        if current is not None and current.device == device:
            return current
        if current is None:
            _training.refuse_new_state("max_norm", device)
            value = torch.full((), UNSET_MAX_NORM, dtype=torch.float32, device=device)
        else:  # created before the model moved (.to(device))
            value = current.to(device)
        return value if pending is None else pending.put(p, "max_norm", value)

    def _sr_seed(self, group: Dict[str, Any], index: int, device: torch.device, pending):
        """``(anchor, seed)``: one seed per (param group, device), kept in the state of that group's
        first bf16 parameter on the device (a fixed place, whichever parameters have gradients
        this step), on that device like the parameter (moved with it, as max_norm is)."""
        anchor = next(p for p in group["params"] if p.dtype == torch.bfloat16 and _local_device(p) == device)
        current = pending.get(anchor, "sr_seed")
        if current is not None and current.device == device:
            return anchor, current
        if current is None:
            _training.refuse_new_state("sr_seed", device)
            if self._sr_base is None:  # rounding switched on in a group after construction
                self._sr_base = _training.initial_seed(None)
            value = torch.full((), _training.group_seed(self._sr_base, index, device), dtype=torch.int64, device=device)
        else:
            value = current.to(device)
        return anchor, pending.put(anchor, "sr_seed", value)

    def _planned(self):
        if torch.compiler.is_compiling():
            return _step_plan.build(self, keep=False)
        plan = self._plan
        if plan is not None and plan.refresh(self):
            return plan
        self._plan = None
        plan = _step_plan.build(self)
        self._plan = plan
        return plan

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one step; return the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = _training.scaler_attributes(self)
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
            for group in plan.seeded:
                _training.advance_seed(group.sr_seed, found_inf, group.lr)
        except BaseException:
            _training.drop_scaler_attributes(self)
            raise
        return loss

    def last_stats(self):
        """Per-parameter statistics of the last step, one :class:`~fromage_fused._monitor.StepStats`
        per group of tensors stepped together (device and dtype within a param group): ``||p||``,
        ``||g||``, ``cos(p, g)``, the step's relative change and whether the ``p_bound`` clamp
        acted, as device tensors (nothing is read on the host). Empty unless ``monitor`` was on."""
        from ._monitor import summarize

        return [summarize(r) for r in (self._last_records or [])]

    # State whose dtype is fixed by contract, whatever the parameter's dtype.
    _STATE_DTYPES = {"max_norm": torch.float32, "sr_seed": torch.int64}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # Everything Fromage reads is checked first (_state_dict.py): a load that raises changes
        # nothing. torch casts every state tensor of a floating parameter to the parameter's dtype
        # (bf16, complex...), which would round max_norm and destroy the int64 seed: the checked
        # values are put back after the base class has loaded. A checkpoint of the reference
        # implementation keeps the bound as a float under "max": it becomes max_norm.
        saved, converted = _state_dict.check(state_dict, self.param_groups, self.defaults, _HYPER_PARAMETERS)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        # torch's loader puts new state and param_groups objects in place: restoring these undoes it.
        before = {key: self.__dict__[key] for key in ("state", "param_groups")}
        try:
            super().load_state_dict(state_dict)
            params = [p for g in self.param_groups for p in g["params"]]
            for pid, p in zip(saved_ids, params):
                if pid not in saved:
                    continue
                state = self.state[p]
                if pid in converted:
                    state.pop(_state_dict.AUTHORS_MAX, None)
                for key, value in saved[pid].items():
                    state[key] = torch.tensor(value, dtype=self._STATE_DTYPES[key], device=_local_device(p))
            for group in self.param_groups:
                self._create_max_norms(group)  # a bounded group whose checkpoint had no bound yet
        except BaseException:
            self.__dict__.update(before)
            raise
        finally:
            self._invalidate_plan()


_FLAGS = ("maximize", "prefactor", "stochastic_rounding")
#: What a param group of Fromage holds besides its params.
# weight_decay is accepted, checked and saved, never used (docs/faq.md).
_HYPER_PARAMETERS = ("lr", "p_bound", "weight_decay") + _FLAGS


def _local_device(p: torch.Tensor) -> torch.device:
    """Where ``p``'s values live: a DTensor's local shard may sit elsewhere than its mesh (CPU offload)."""
    local = getattr(p, "_local_tensor", None)
    return (local if isinstance(local, torch.Tensor) else p).device
