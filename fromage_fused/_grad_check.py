"""Per-step revalidation of a step plan: is each tensor still what the plan was built for?

A plan is built for one list of parameters: which of them have gradients, and each stepped
parameter's address, shape, strides, dtype and device, and its gradient's layout and contiguity.
Every step brings new gradient tensors (``zero_grad()`` sets them to None, backward makes new ones),
so every step checks, for every parameter of the list:

- it is the same tensor object as when the plan was built, and has a gradient exactly when it had;
- a stepped parameter still has its address, shape, strides, dtype and device (``p.data = ...`` and
  ``module.to(...)`` change them; so does ``p.data = p.data[:k]`` on the same storage: backends
  keep what they derive from a plan's tensors, element counts and addresses, and the overlap check
  of a build holds only for the ranges it saw);
- its gradient is strided, of the parameter's dtype, device and shape, as contiguous as then, and
  lazily negated or conjugated exactly when it was then.

Anything else means "build the plan again" (which explains what is wrong, if anything is).
:class:`Record` does these checks in one C++ call per list when the extension is loaded
(``csrc/fromage_plan.cpp``: it holds the tensors, so no list is converted on the way in), else
with ``map`` over the lists in Python; both check the same.
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import List, Optional, Sequence

import torch

__all__ = ["Record", "native_available"]

_GRAD = operator.attrgetter("grad")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_SHAPE = operator.attrgetter("shape")
_STRIDE = torch.Tensor.stride
_LAYOUT = operator.attrgetter("layout")
_PTR = torch.Tensor.data_ptr
_CONTIGUOUS = torch.Tensor.is_contiguous
_NEG = torch.Tensor.is_neg
_CONJ = torch.Tensor.is_conj
_is = operator.is_


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def native_available(params: Sequence[torch.Tensor]) -> bool:
    """Whether the C++ checks can take ``params``: the extension is loaded (this never loads it: a
    step that uses no native backend must not start a build) and has them, and every parameter is
    a plain tensor (a tensor subclass could intercept the op)."""
    if not all(type(p) in _PLAIN for p in params):
        return False
    try:
        from .backends import native

        if native._state["loaded"] is None:
            return False
        torch.classes.fromage_fused.PlanRecord  # noqa: B018 (raises when the extension predates it)
        return True
    except Exception:  # no extension, or one built from older sources without the op
        return False


class Record:
    """What one list of parameters looked like when its plan was built.

    ``order``: positions (in the list) of the parameters that had gradients, in the order the plan
    steps them; :meth:`grads` returns their current gradients in that order, or None when anything
    the plan depends on has changed. Built right after the plan validated these same tensors.
    """

    def __init__(self, params: Sequence[torch.Tensor], order: Sequence[int], *, native: bool):
        self.params = list(params)
        self.count = len(self.params)
        planned = set(order)
        self.planned = [self.params[i] for i in order]
        self.absent = [p for i, p in enumerate(self.params) if i not in planned]
        self.native = None
        if native:
            self.native = torch.classes.fromage_fused.PlanRecord(self.planned, self.absent)
            return
        grads = list(map(_GRAD, self.planned))
        self.ptrs = list(map(_PTR, self.planned))
        self.shapes = list(map(_SHAPE, self.planned))
        self.strides = list(map(_STRIDE, self.planned))
        self.dtypes = list(map(_DTYPE, self.planned))
        self.devices = list(map(_DEVICE, self.planned))
        self.contiguous = list(map(_CONTIGUOUS, self.planned))
        self.grad_contiguous = list(map(_CONTIGUOUS, grads))
        self._lazy(grads)
        self.layouts = [torch.strided] * len(grads)

    def _lazy(self, grads) -> None:
        # Lazily negated (or, for complex tensors, conjugated) gradients are materialised by the
        # plan; which ones are is part of what it was built for.
        self.neg = list(map(_NEG, grads))
        self.conj = list(map(_CONJ, grads)) if any(d.is_complex for d in self.dtypes) else None

    def grads(self, params: Sequence[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """The gradients of the planned parameters, or None if the plan no longer fits."""
        if len(params) != self.count or not all(map(_is, params, self.params)):
            return None
        if self.native is not None:
            grads, same = self.native.grads()
            return grads if same else None
        if not all(map(_is, map(_GRAD, self.absent), repeat(None))):
            return None
        planned = self.planned
        grads = list(map(_GRAD, planned))
        if any(map(_is, grads, repeat(None))):
            return None
        return grads if self._fits(planned, grads) else None

    def _fits(self, params, grads) -> bool:
        return (
            list(map(_PTR, params)) == self.ptrs
            and list(map(_SHAPE, params)) == self.shapes
            and list(map(_STRIDE, params)) == self.strides
            and list(map(_LAYOUT, grads)) == self.layouts
            and list(map(_DTYPE, params)) == self.dtypes
            and list(map(_DTYPE, grads)) == self.dtypes
            and list(map(_DEVICE, params)) == self.devices
            and list(map(_DEVICE, grads)) == self.devices
            and list(map(_SHAPE, grads)) == list(map(_SHAPE, params))
            and list(map(_CONTIGUOUS, params)) == self.contiguous
            and list(map(_CONTIGUOUS, grads)) == self.grad_contiguous
            and list(map(_NEG, grads)) == self.neg
            and (self.conj is None or list(map(_CONJ, grads)) == self.conj)
        )

    def pairs(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> bool:
        """For tensors whose gradients are not in ``.grad`` (DTensor shards): whether ``params``
        (all planned, in order) and ``grads`` still fit. Python only."""
        if len(params) != len(self.planned) or not all(map(_is, params, self.planned)):
            return False
        if any(map(_is, grads, repeat(None))):
            return False
        return self._fits(params, grads)


def record_pairs(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> Record:
    """A Python :class:`Record` of explicit (parameter, gradient) pairs (DTensor shards)."""
    rec = Record.__new__(Record)
    rec.params = list(params)
    rec.count = len(rec.params)
    rec.planned = list(params)
    rec.absent = []
    rec.native = None
    rec.ptrs = list(map(_PTR, params))
    rec.shapes = list(map(_SHAPE, params))
    rec.strides = list(map(_STRIDE, params))
    rec.dtypes = list(map(_DTYPE, params))
    rec.devices = list(map(_DEVICE, params))
    rec.contiguous = list(map(_CONTIGUOUS, params))
    rec.grad_contiguous = list(map(_CONTIGUOUS, grads))
    rec._lazy(grads)
    rec.layouts = [torch.strided] * len(grads)
    return rec
