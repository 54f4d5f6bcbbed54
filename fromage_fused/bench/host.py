"""Host work per step: the contenders of the ``host-overhead`` preset.

On that preset (thousands of tiny tensors) a step's time is almost all host work: Python, the
dispatcher and per-tensor bookkeeping, not arithmetic. Besides the usual contenders it runs:

- ``bound:NAME``: ``Fromage(backend=NAME, p_bound=1.0)``, the bounded step;
- ``torch:adamw-foreach``: ``AdamW(foreach=True)``, the yardstick of the ``foreach`` backend;
- ``stub:triton``, ``stub:cuda`` (CPU only): the triton and cuda backends' host side on CPU
  tensors with their device work stubbed out. ``stub:triton`` runs the backend's whole Python side
  (checks, tables, argument preparation) and skips only the kernel launches; ``stub:cuda`` runs
  the Python side of the native backend and replaces the two extension calls by stubs, so the
  C++ host code of the CUDA ops (argument tables, launches) is not in it.

These contenders exist only when the preset is selected and raise :class:`NotHere` on the others,
which the runner drops without a row.
"""
from __future__ import annotations

import importlib
from typing import List

import torch

from .. import Fromage, available_backends
from . import traffic

PRESET = "host-overhead"
#: The p_bound of the ``bound:`` contenders when the run sets none.
BOUND = 1.0


def _only_here(ctx, contenders):
    if ctx.preset != PRESET:
        raise contenders.NotHere(f"a host-work contender: runs on the {PRESET} preset only")


def _with_backend(params, backend, *, p_bound=None, lr=0.01):
    # The optimizer resolves a backend per device once; a stub takes the place of that choice.
    opt = Fromage(params, lr=lr, p_bound=p_bound, backend="foreach")
    opt._device_backends[params[0].device] = backend
    opt._invalidate_plan()  # the plan holds the backend it was built with
    return opt


def _bound(name, contenders):
    def build(params, ctx):
        _only_here(ctx, contenders)
        return Fromage(params, lr=ctx.settings.lr, p_bound=ctx.settings.p_bound or BOUND, backend=name).step

    return build


def _adamw_foreach(contenders):
    def build(params, ctx):
        _only_here(ctx, contenders)
        return torch.optim.AdamW(params, lr=ctx.settings.adamw_lr, foreach=True).step

    return build


def _stub_triton(contenders):
    def build(params, ctx):
        _only_here(ctx, contenders)
        try:
            module = importlib.import_module("fromage_fused.backends.triton")
            importlib.import_module("triton")
        except ImportError as exc:
            raise contenders.Skip(f"triton is not importable here ({exc})") from None
        if not hasattr(module, "_launch"):
            raise contenders.Skip("the triton backend has no _launch hook to stub")

        class Stubbed(type(module.BACKEND)):
            def unavailable_reason(self, device):
                return None

        backend = Stubbed()
        opt = _with_backend(params, backend, lr=ctx.settings.lr, p_bound=ctx.settings.p_bound)

        def step():
            launch = module._launch
            module._launch = lambda *args, **kwargs: None
            try:
                opt.step()
            finally:
                module._launch = launch

        return step

    return build


def _stub_cuda(contenders):
    def build(params, ctx):
        _only_here(ctx, contenders)
        from ..backends import native

        try:
            native.load()  # the wrapper checks that the extension is there before each call
        except Exception as exc:
            raise contenders.Skip(f"the C++ extension is not available here ({str(exc)[:120]})") from None

        class Stubbed(native.NativeBackend):
            """The cuda backend's Python side on CPU tensors; the two extension calls are stubs."""

            def __init__(self):
                super().__init__("stub-cuda", "cpu", -1)
                self._ops = _StubOps()

            def unavailable_reason(self, device):
                return None

        opt = _with_backend(params, Stubbed(), lr=ctx.settings.lr, p_bound=ctx.settings.p_bound)
        return opt.step

    return build


class _StubOps:
    """Stands for ``torch.ops.fromage_fused``: same arguments, no work."""

    def pass_(self, rule, index, writes, reads, sums, hyper, flags, *args):
        from ..rules import registered

        spec = registered()[rule].passes[index]
        return torch.zeros((len(writes) + len(reads)) // len(spec.lists_for(flags)[0]), spec.sums)


def contenders_for(device, settings, contenders) -> List:
    """The extra contenders of the host-overhead preset on ``device``."""
    C = contenders.Contender
    two = traffic.FROMAGE_TWO_PHASE
    found = [C(f"bound:{name}", two, two, _bound(name, contenders),
               f"Fromage(backend={name!r}, p_bound={settings.p_bound or BOUND})")
             for name in available_backends(device) if name != "reference"]
    found.append(C("torch:adamw-foreach", traffic.ADAMW, traffic.ADAMW, _adamw_foreach(contenders),
                   "torch.optim.AdamW(foreach=True)"))
    if torch.device(device).type == "cpu":
        found.append(C("stub:triton", two, two, _stub_triton(contenders),
                       "triton backend's host side on CPU, kernel launches stubbed"))
        found.append(C("stub:cuda", two, two, _stub_cuda(contenders),
                       "native (cuda) backend's Python side on CPU, extension calls stubbed (C++ launch code not "
                       "included)"))
    return found

