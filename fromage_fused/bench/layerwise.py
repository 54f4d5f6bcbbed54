"""The layer-wise adaptive optimizers' contenders: LARS and LAMB, from this package and others.

Every LARS contender runs with ``LARS_OPTIONS`` and every LAMB contender with ``LAMB_OPTIONS``, so
that their times compare the same computation:

- ``timm:lars``, ``timm:lamb``: timm's ``Lars`` and ``Lamb`` (per-tensor loops on CPU tensors,
  timm's multi-tensor path on CUDA ones), loaded from timm's installed files;
- ``apex:fusedlamb`` (CUDA): apex's ``FusedLAMB`` with the options that make it timm's ``Lamb``
  (``adam_w_mode=True`` is timm's ``decoupled_decay=False``); it writes its update into ``.grad``;
- ``lars:NAME``, ``lamb:NAME``: this package's ``LARS`` and ``LAMB`` on each backend available
  here, once the package has them.

pytorch_optimizer's ``LARS`` and ``Lamb`` are not contenders: their rules differ (its LARS adapts
only tensors of two or more dimensions, has no eps and starts momentum at zeros; its Lamb has no
bias correction of the update, clamps ‖p‖ at 10 and adds eps to the trust ratio's denominator).
"""
from __future__ import annotations

from typing import List

import torch

import fromage_fused as _package

from .. import available_backends
from . import external, traffic

#: LARS as large-batch ResNet recipes run it: momentum, weight decay, so every tensor is adapted.
LARS_OPTIONS = dict(lr=1.0, momentum=0.9, weight_decay=1e-4)
#: LAMB with timm's defaults: weight decay 0.01 (every tensor adapted), global clipping at 1.0.
LAMB_OPTIONS = dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)


def _timm(index, options, contenders):
    def build(params, ctx):
        try:
            cls = external.timm_optimizers()[index]
        except external.Unavailable as exc:
            raise contenders.Skip(str(exc)) from None
        return cls(params, **options).step

    return build


def _apex_lamb(contenders):
    def build(params, ctx):
        try:
            cls = external.apex_fused_lamb()
        except external.Unavailable as exc:
            raise contenders.Skip(str(exc)) from None
        if params[0].dtype not in (torch.float32, torch.float16):
            raise contenders.Skip(f"FusedLAMB takes fp32 and fp16 parameters only, not {params[0].dtype}")
        return cls(params, adam_w_mode=True, use_nvlamb=False, **LAMB_OPTIONS).step

    return build


def _rule(cls, backend, options):
    def build(params, ctx):
        return cls(params, backend=backend, **options).step

    return build


def contenders_for(device, settings, contenders) -> List:
    """This module's contenders on ``device``, in report order."""
    C = contenders.Contender
    found = []
    for kind, index, options, work, timm_bytes in (("lars", 0, LARS_OPTIONS, traffic.LARS_MOMENTUM, traffic.TIMM_LARS),
                                                   ("lamb", 1, LAMB_OPTIONS, traffic.LAMB_CLIPPED, traffic.TIMM_LAMB)):
        cls = getattr(_package, kind.upper(), None)
        if cls is not None:
            for name in available_backends(device):
                found.append(C(f"{kind}:{name}", work, work, _rule(cls, name, options),
                               f"{kind.upper()}(backend={name!r})"))
        found.append(C(f"timm:{kind}", work, timm_bytes, _timm(index, options, contenders),
                       f"timm.optim.{('Lars', 'Lamb')[index]}({', '.join(f'{k}={v}' for k, v in options.items())})"))
    if torch.device(device).type == "cuda":
        found.append(C("apex:fusedlamb", traffic.LAMB_CLIPPED, traffic.APEX_LAMB, _apex_lamb(contenders),
                       "apex.optimizers.FusedLAMB (adam_w_mode=True: timm's coupled decay)"))
    return found
