"""``Fromage``: the optimizer users construct, the engine's optimizer with the Fromage rule."""
from __future__ import annotations

from typing import Optional

from ...engine.optimizer import EngineOptimizer
from .rule import FROMAGE

__all__ = ["Fromage"]

class Fromage(EngineOptimizer):
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

    rule = FROMAGE

    def __init__(self, params, lr=0.01, p_bound: Optional[float] = None, *, maximize: bool = False,
                 prefactor: bool = True, backend: str = "auto", stochastic_rounding: bool = False,
                 seed: Optional[int] = None, monitor: bool = False, weight_decay: float = 0.0):
        defaults = dict(lr=lr, p_bound=p_bound, maximize=maximize, prefactor=prefactor,
                        stochastic_rounding=stochastic_rounding, weight_decay=weight_decay)
        super().__init__(params, defaults, backend=backend, seed=seed, monitor=monitor)

    def last_stats(self):
        """Per-parameter statistics of the last step, one :class:`~fromage_fused.rules.fromage.monitor.StepStats`
        per group of tensors stepped together (device and dtype within a param group): ``||p||``,
        ``||g||``, ``cos(p, g)``, the step's relative change and whether the ``p_bound`` clamp
        acted, as device tensors (nothing is read on the host). Empty unless ``monitor`` was on."""
        return super().last_stats()
