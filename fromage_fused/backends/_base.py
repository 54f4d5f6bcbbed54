"""The op contract every backend implements: two phases over one (device, dtype) group of tensors.

What a backend may rely on when the step plan (``_groups.Group``, built by the optimizer, the
functional API and the DTensor route alike) calls it, so that it need not check again:

- ``params`` and ``grads`` are non-empty lists of equal length; every tensor is strided, of one
  dtype (real: complex tensors come as their ``view_as_real``) that ``supports_dtype`` accepts, and
  on one device; each gradient has its parameter's shape; no two parameters overlap.
- With ``dense_only`` (the default) every tensor is contiguous: the plan steps contiguous copies of
  strided parameters and writes them back after ``apply``; of strided gradients, copies.
- ``stats`` passed to ``apply`` is what ``stats`` returned for the same lists, or its sum over the
  ranks holding shards of the same tensors (same shape and dtype, contiguous, on the device).
- ``lr`` is a 0-d tensor on the device in the accumulation dtype (float64 for float64 groups, else
  float32); one that is negative or beyond float32 (or NaN: a tensor lr edited after construction,
  never read on the host) skips the step as ``found_inf`` does (``_math.usable_lr``); ``found_inf`` and ``grad_scale`` are None or 0-d float32 tensors on the device;
  ``sr_seed`` is None or a 0-d int64 tensor on the device, given only to bfloat16 groups;
  ``max_norm`` is None without ``p_bound``, else one contiguous ``[n]`` float32 tensor on the device
  (entry ``i`` for ``params[i]``), read and written in place.
- Across steps, while the optimizer's plan holds, the same ``params`` list object comes back with
  the same tensors, each with the same ``PLAN_KEY`` (address, shape, strides, dtype, device: a
  change of any one of them builds a new plan and a new list); only ``grads`` (a new list each
  step) and the values change. Without
  views in play (complex parameters, contiguous copies of strided ones) the lists are
  ``_groups.PlanList``s: their ``memo`` dict is where a backend keeps what it derives from the
  tensors (sizes, addresses), once per plan for ``params``, once per step for
  ``grads``. Direct calls (tests, the functional API) pass plain lists, which carry no such promise.
- Calls run in stats-then-apply order per group, on the host thread of the step, with no host
  synchronisation expected (``syncs`` backends excepted).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: What the step plan keys each tensor of a ``params`` list on: a backend may keep whatever it
#: derives from these in the list's ``memo`` (the triton backend: element counts, addresses).
PLAN_KEY = ("data_ptr", "shape", "stride", "dtype", "device")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why and what to do."""


class Backend:
    """Base class of a backend. Subclasses set ``name``, ``priority`` and implement the two phases.

    ``priority``: higher runs first under ``backend="auto"`` (the registry sorts by it).
    ``syncs``: True only for the reference backend, which may read tensor values on the host.
    ``dense_only``: see the module docstring.
    """

    name: str = ""
    priority: int = 0
    syncs: bool = False
    dtypes: tuple = FLOAT_DTYPES
    #: Receive contiguous tensors only (the plan makes the copies); False: any strided layout.
    dense_only: bool = True

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        """Why this backend cannot run on ``device`` here, or None if it can.

        Cheap checks only (device type, a module importable). Raising ``BackendUnavailable`` is for
        a backend that should work here but failed to load (a failed build, say): under ``auto``
        that falls back with a warning instead of silently.
        """
        return None

    def priority_on(self, device: torch.device) -> int:
        """Rank on ``device``: ``auto`` takes the highest that works (a backend that runs on a
        device only for testing, like Triton's CPU interpreter, ranks itself low there)."""
        return self.priority

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes

    def stats(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, inner: bool = True) -> torch.Tensor:
        """Per tensor ``[||p||^2, ||g||^2, <p, g>]`` as an ``[n, 3]`` tensor on the group's device.

        float32 for float32/bf16/fp16 tensors, float64 for float64. ``inner=False`` lets a backend
        leave column 2 as zeros when nothing will read it (no p_bound).
        """
        raise NotImplementedError

    def apply(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        stats: torch.Tensor,
        *,
        lr: torch.Tensor,
        max_norm: Optional[torch.Tensor],
        p_bound: Optional[float],
        maximize: bool,
        prefactor: bool = True,
        found_inf: Optional[torch.Tensor] = None,
        grad_scale: Optional[torch.Tensor] = None,
        sr_seed: Optional[torch.Tensor] = None,
    ) -> None:
        """Update ``params`` in place from ``stats``; set the unset (negative) entries of ``max_norm`` in place.

        ``lr``: 0-d tensor on the group's device; unusable (``_math.usable_lr``), nothing changes.
        ``found_inf``: 0-d float tensor; when it is
        non-zero nothing changes (parameters nor max_norm). ``grad_scale``: 0-d tensor by which
        the gradients are multiplied; only the zero-norm fallback depends on it. ``sr_seed``: 0-d
        int64 tensor; when given, bf16 results are rounded stochastically exactly as
        ``_math.stochastic_round_bf16(result_fp32, sr_seed, i)`` with ``i`` the tensor's position
        in ``params`` (other dtypes ignore it).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fromage_fused backend {self.name!r}>"
