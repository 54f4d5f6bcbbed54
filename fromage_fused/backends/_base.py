"""The contract every backend implements: run one pass of a rule over one (device, dtype) group.

What a backend may rely on when the engine (``engine/execute.py``, for the optimizers, the
functional APIs and the DTensor route alike) calls ``run_pass(rule, index, call)``, so that it
need not check again (``call`` is an ``engine.execute.Call``):

- ``call.lists`` are non-empty lists of equal length, in the order of the pass's ``lists`` (the
  first ``call.writes`` are written in place); every tensor is strided and real (complex tensors
  come as their ``view_as_real``), on one device; parameters and gradients of one dtype that
  ``supports`` accepted, buffers of ``engine.dtypes.buffer_dtype`` of it; every tensor of its
  parameter's shape; no two parameters overlap.
- With ``dense_only`` (the default) every tensor is contiguous: the plan steps contiguous copies of
  strided parameters and writes them back after the step; of strided gradients, copies.
- ``call.sums`` is what the previous pass returned for the same lists, or its sum over the ranks
  holding shards of the same tensors (same shape and dtype, contiguous, on the device).
- ``call.hyper`` is the rule's packed hyper-parameters (``engine.spec.Spec.pack``) on the device
  in the accumulation dtype (float64 for float64 groups, else float32); a tensor ``lr`` in it that
  is negative or beyond float32 (or NaN: a tensor lr edited after construction, never read on the
  host) skips the step as ``found_inf`` does (``engine.spec.usable_lr``; each rule's passes check
  it); ``call.flags`` the rule's
  flag bits; ``call.found_inf`` and ``call.grad_scale`` are None or 0-d float32 tensors on the
  device; ``call.seed`` is None or a 0-d int64 tensor on the device, given only to bfloat16
  groups that round stochastically; ``call.scalars`` holds each per-tensor scalar state as one
  contiguous ``[n]`` tensor on the device (entry ``i`` for tensor ``i``), read and written in place.
- Across steps, while the optimizer's plan holds, the same parameter and buffer list objects come
  back with the same tensors, each with the same ``PLAN_KEY`` (address, shape, strides, dtype,
  device: a change of any one of them builds a new plan and new lists); only the gradients (a new
  list each step) and the values change. Without views in play (complex parameters, contiguous
  copies of strided ones) the lists are ``engine.groups.PlanList``s: their ``memo`` dict is where a
  backend keeps what it derives from the tensors (sizes, addresses), once per plan for parameters
  and buffers, once per step for gradients. Direct calls (tests, the functional APIs) pass plain
  lists, which carry no such promise.
- Passes run in order per step, on the host thread of the step, with no host synchronisation
  expected (``syncs`` backends excepted).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..engine.dtypes import REAL_DTYPES

#: What the step plan keys each tensor of a list on: a backend may keep whatever it derives from
#: these in the list's ``memo`` (the triton backend: element counts, addresses).
PLAN_KEY = ("data_ptr", "shape", "stride", "dtype", "device")


class BackendUnavailable(RuntimeError):
    """A backend cannot run here; the message says why and what to do."""


class Backend:
    """Base class of a backend. Subclasses set ``name``, ``priority`` and implement ``run_pass``.

    ``priority``: higher runs first under ``backend="auto"`` (the registry sorts by it).
    ``syncs``: True only for the reference backend, which may read tensor values on the host.
    ``dense_only``: see the module docstring. ``kind``: the attribute of a rule that holds the
    rule's math for this backend (None: the backend runs any rule generically).
    """

    name: str = ""
    priority: int = 0
    syncs: bool = False
    dtypes: tuple = REAL_DTYPES
    #: Receive contiguous tensors only (the plan makes the copies); False: any strided layout.
    dense_only: bool = True
    kind: Optional[str] = None

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

    def has_rule(self, rule) -> bool:
        return self.kind is None or getattr(rule, self.kind, None) is not None

    def supports(self, rule, dtype: torch.dtype) -> bool:
        """Whether this backend steps groups of ``dtype`` tensors with ``rule``."""
        return self.supports_dtype(dtype) and self.has_rule(rule)

    def run_pass(self, rule, index: int, call) -> Optional[torch.Tensor]:
        """Run pass ``index`` of ``rule`` over one group: write the pass's written lists (and
        per-tensor scalars) in place; return its ``[n, k]`` per-tensor sums in the accumulation
        dtype on the device, or None for a pass without sums. A non-zero ``call.found_inf`` leaves
        everything as it was."""
        return getattr(rule, self.kind).run_pass(index, call)

    def pairs(self, call) -> bool:
        """Whether :meth:`run_pair` may run ``call``'s group (the executor asks only where the pair
        allows it: ``engine/execute.py``)."""
        return False

    def run_pair(self, rule, index: int, call) -> Optional[torch.Tensor]:
        """Run passes ``index`` and ``index + 1`` of ``rule`` over one group together (tensor block by
        tensor block), the second reading each tensor's sums of the first and returning none: the
        results and the first pass's sums are those of two :meth:`run_pass` calls."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<fromage_fused backend {self.name!r}>"
