"""``Fromage``: the torch.optim.Optimizer users construct. It owns hyper-parameters and state."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.optim import Optimizer

from . import _training
from . import backends as _backends
from .distributed import ShardedStep
from .functional import UNSET_MAX_NORM, check_lr as _check_lr, check_p_bound as _check_p_bound, plan, step_groups

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

    Works with ``torch.amp.GradScaler`` without an unscale pass, with CUDA-graph capture (``lr``
    as a device tensor, state created by eager warm-up steps) and with ``torch.compile``.
    """

    # GradScaler then skips its unscale pass and sets ``grad_scale`` / ``found_inf`` before step():
    # the update is invariant to the gradient's scale except in the zero-norm fallback.
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=0.01, p_bound: Optional[float] = None, *, maximize: bool = False, prefactor: bool = True,
                 backend: str = "auto", stochastic_rounding: bool = False, seed: Optional[int] = None):
        _check_lr(lr)
        _check_p_bound(p_bound)
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a name, got {backend!r}")
        self.backend = _backends.requested_name(backend)
        # Drawn from torch's generator only for a group that rounds stochastically: constructing
        # the optimizer must not shift the random stream of a run that does not use it.
        self._sr_base = None if seed is None else _training.initial_seed(seed)
        self._device_backends: Dict[torch.device, _backends.Backend] = {}
        defaults = dict(lr=lr, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if "lr" in param_group:
            _check_lr(param_group["lr"])
        if "p_bound" in param_group:
            _check_p_bound(param_group["p_bound"])
        for flag in ("maximize", "prefactor", "stochastic_rounding"):
            # Strictly bools: bool("False") is True, so a string would silently do the opposite.
            value = param_group.get(flag, self.defaults[flag])
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        rounding = param_group.get("stochastic_rounding", self.defaults["stochastic_rounding"])
        if rounding and self._sr_base is None:
            self._sr_base = _training.initial_seed(None)
        params = param_group["params"]
        if not isinstance(params, set):  # the base class refuses sets with its own message
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for p in params:
                if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(f"Fromage steps floating-point and complex tensors only, got a {p.dtype} parameter")
            param_group["params"] = params
        super().add_param_group(param_group)
        try:
            for p in self.param_groups[-1]["params"]:
                self._backend_for(p.device)
        except Exception:
            self.param_groups.pop()  # a group whose backend cannot run is not added
            raise
        self._create_max_norms(self.param_groups[-1])

    def _create_max_norms(self, group: Dict[str, Any]) -> None:
        # Unset max_norm state exists from the start so that torch.distributed.checkpoint's
        # get_state_dict finds state and skips its state-creating step (lr=0, zero gradients),
        # which would set max_norm from the weights of that moment and clamp them to it.
        if group["p_bound"] is not None:
            for p in group["params"]:
                self._max_norm(p)

    def __getstate__(self) -> Dict[str, Any]:
        # torch keeps only defaults, state and param_groups; the backend choice and the seed
        # belong to the optimizer too (resolved backends are not copied: they are found again).
        state = super().__getstate__()
        state.update(backend=self.backend, _sr_base=self._sr_base)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # Groups saved before a hyper-parameter existed (or by another Fromage) get its default.
        for group in self.param_groups:
            group.setdefault("p_bound", None)
            group.setdefault("maximize", False)
            group.setdefault("prefactor", True)
            group.setdefault("stochastic_rounding", False)
        self.__dict__.setdefault("backend", _backends.AUTO)
        self.__dict__.setdefault("_sr_base", None)
        self.__dict__.setdefault("_device_backends", {})

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

    def _max_norm(self, p: torch.Tensor) -> torch.Tensor:
        # Created on the host without reading any value: the step itself sets an unset one.
        state = self.state[p]
        if "max_norm" not in state:
            _training.refuse_new_state("max_norm", p.device)
            state["max_norm"] = torch.full((), UNSET_MAX_NORM, dtype=torch.float32, device=p.device)
        elif state["max_norm"].device != p.device:  # created before the model moved (.to(device))
            state["max_norm"] = state["max_norm"].to(p.device)
        return state["max_norm"]

    def _sr_seed(self, group: Dict[str, Any], device: torch.device) -> torch.Tensor:
        # One seed per (param group, device), kept in the state of that group's first bf16
        # parameter on the device: a fixed place, whichever parameters have gradients this step.
        anchor = next(p for p in group["params"] if p.dtype == torch.bfloat16 and p.device == device)
        state = self.state[anchor]
        if "sr_seed" not in state:
            _training.refuse_new_state("sr_seed", device)
            # The group that holds the anchor (a parameter is in one group only): torch 2.6-2.7's
            # compile cannot trace `is` between two param-group dicts.
            index = next(i for i, g in enumerate(self.param_groups) if any(q is anchor for q in g["params"]))
            if self._sr_base is None:  # rounding switched on in a group after construction
                self._sr_base = _training.initial_seed(None)
            value = _training.group_seed(self._sr_base, index, device)
            state["sr_seed"] = torch.full((), value, dtype=torch.int64, device=device)
        return state["sr_seed"]

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one step; return the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _training.scaler_attributes(self) as (grad_scale, found_inf):
            # Plan (validate, group, find or create state) for every param group before any
            # parameter changes, and before any kernel is enqueued.
            planned = []
            sharded = ShardedStep(self._backend_for, self._max_norm)  # DTensor (FSDP2) parameters: see distributed.py
            for group in self.param_groups:
                # Groups can be edited after construction (schedulers, users): check what costs no sync.
                _check_lr(group["lr"], read_tensor=False)
                _check_p_bound(group["p_bound"])
                params = [p for p in group["params"] if p.grad is not None]
                for device in dict.fromkeys(p.device for p in params):  # DTensor parameters included
                    _training.check_capturable_lr(group["lr"], device)
                params = sharded.take(group, params)
                for device in dict.fromkeys(p.device for p in params):
                    on_device = [p for p in params if p.device == device]
                    for g in plan(on_device, [p.grad for p in on_device], None, backend=self._backend_for(device)):
                        if group["p_bound"] is not None:
                            g.max_norms = [self._max_norm(on_device[i]) for i in g.indices]
                        sr_seed = None
                        if group["stochastic_rounding"] and g.dtype == torch.bfloat16:
                            sr_seed = self._sr_seed(group, g.device)
                        planned.append((group, g, sr_seed))
            for group, g, sr_seed in planned:
                step_groups(
                    [g],
                    lr=group["lr"],
                    p_bound=group["p_bound"],
                    maximize=group["maximize"],
                    prefactor=group["prefactor"],
                    found_inf=found_inf,
                    grad_scale=grad_scale,
                    sr_seed=sr_seed,
                )
                if sr_seed is not None:
                    _training.advance_seed(sr_seed, found_inf)
            sharded.step(found_inf=found_inf, grad_scale=grad_scale)
        return loss

    # State whose dtype is fixed by contract, whatever the parameter's dtype.
    _STATE_DTYPES = {"max_norm": torch.float32, "sr_seed": torch.int64}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch casts every state tensor of a floating parameter to the parameter's dtype (bf16,
        # complex...), which would round max_norm and destroy the int64 seed: put the saved values
        # back after the base class has loaded.
        saved = {
            k: {key: v[key] for key in self._STATE_DTYPES if key in v}
            for k, v in state_dict["state"].items() if isinstance(v, dict)
        }
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            for key, value in saved.get(pid, {}).items():
                dtype = self._STATE_DTYPES[key]
                self.state[p][key] = torch.as_tensor(value).detach().to(device=p.device, dtype=dtype).clone().reshape(())
