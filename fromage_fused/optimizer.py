"""``Fromage``: the torch.optim.Optimizer users construct. It owns hyper-parameters and state."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.optim import Optimizer

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
            one of :func:`fromage_fused.available_backends`.
    """

    def __init__(self, params, lr=0.01, p_bound: Optional[float] = None, *, maximize: bool = False, prefactor: bool = True, backend: str = "auto"):
        _check_lr(lr)
        _check_p_bound(p_bound)
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a name, got {backend!r}")
        self.backend = _backends.requested_name(backend)
        defaults = dict(lr=lr, p_bound=p_bound, maximize=bool(maximize), prefactor=bool(prefactor))
        super().__init__(params, defaults)
        if self.backend != _backends.AUTO:
            for device in {p.device for g in self.param_groups for p in g["params"]}:
                _backends.check(self.backend, device)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if "lr" in param_group:
            _check_lr(param_group["lr"])
        if "p_bound" in param_group:
            _check_p_bound(param_group["p_bound"])
        params = param_group["params"]
        if not isinstance(params, set):  # the base class refuses sets with its own message
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for p in params:
                if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
                    raise ValueError(f"Fromage steps floating-point and complex tensors only, got a {p.dtype} parameter")
            param_group["params"] = params
        super().add_param_group(param_group)
        self._create_max_norms(self.param_groups[-1])

    def _create_max_norms(self, group: Dict[str, Any]) -> None:
        # Unset max_norm state exists from the start so that torch.distributed.checkpoint's
        # get_state_dict finds state and skips its state-creating step (lr=0, zero gradients),
        # which would set max_norm from the weights of that moment and clamp them to it.
        if group["p_bound"] is not None:
            for p in group["params"]:
                self._max_norm(p)

    def __getstate__(self) -> Dict[str, Any]:
        # The base class pickles only defaults, state and groups; the backend choice travels too.
        state = super().__getstate__()
        state["backend"] = self.backend
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state.setdefault("backend", getattr(self, "backend", _backends.AUTO))
        super().__setstate__(state)
        # Groups saved before a hyper-parameter existed (or by another Fromage) get its default.
        for group in self.param_groups:
            group.setdefault("p_bound", None)
            group.setdefault("maximize", False)

    def _max_norm(self, p: torch.Tensor) -> torch.Tensor:
        # Created on the host without reading any value: the step itself sets an unset one.
        state = self.state[p]
        if "max_norm" not in state:
            state["max_norm"] = torch.full((), UNSET_MAX_NORM, dtype=torch.float32, device=p.device)
        elif state["max_norm"].device != p.device:  # created before the model moved (.to(device))
            state["max_norm"] = state["max_norm"].to(p.device)
        return state["max_norm"]

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one step; return the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Plan (validate and group) every param group before any parameter or state changes.
        planned = []
        sharded = ShardedStep(self.backend)  # DTensor (FSDP2) parameters: see distributed.py
        for group in self.param_groups:
            # Groups can be edited after construction (schedulers, users): check what costs no sync.
            _check_lr(group["lr"], read_tensor=False)
            _check_p_bound(group["p_bound"])
            params = sharded.take(group, [p for p in group["params"] if p.grad is not None])
            if params:
                grads = [p.grad for p in params]
                planned.append((group, params, plan(params, grads, None, backend=self.backend)))
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, params, groups in planned:
            p_bound = group["p_bound"]
            if p_bound is not None:
                for g in groups:
                    g.max_norms = [self._max_norm(params[i]) for i in g.indices]
            step_groups(
                groups,
                lr=group["lr"],
                p_bound=p_bound,
                maximize=group["maximize"],
                prefactor=group["prefactor"],
                found_inf=found_inf,
                grad_scale=grad_scale,
            )
        sharded.step(self._max_norm, found_inf=found_inf, grad_scale=grad_scale)
        return loss

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("prefactor", True)  # saved before the option existed

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # torch casts floating state to each parameter's dtype (bf16, complex...); max_norm is
        # float32 by contract, so put the saved values back after the base class has loaded.
        saved = {k: v["max_norm"] for k, v in state_dict["state"].items() if isinstance(v, dict) and "max_norm" in v}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in saved:
                self.state[p]["max_norm"] = torch.as_tensor(saved[pid]).detach().to(device=p.device, dtype=torch.float32).clone().reshape(())
