"""What the benchmark times: every way a user could run a step on the same tensors.

A contender builds a ``step()`` for one list of parameters whose ``.grad`` is set. The Fromage
backends come from the registry (a new backend appears here by registering, nothing else); the
per-tensor loop, ``torch.compile`` of the foreach step, and torch's fused SGD and AdamW are the
alternatives and yardsticks; LARS and LAMB, this package's and others', come from ``layerwise.py``.
"""
from __future__ import annotations

import fnmatch
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from .. import Fromage, available_backends
from .. import backends as _backends
from ..rules.fromage import phases
from . import host, layerwise, traffic
from .loop import LoopFromage

LOOP = "loop"
FOREACH = "fromage:foreach"
COMPILE = "compile:foreach"
SGD = "torch:sgd"
ADAMW = "torch:adamw"
AMP_FROMAGE = "amp:fromage"
AMP_ADAMW = "amp:adamw"
#: The contenders every other is compared with, by the report's column name.
BASELINES = {"vs_loop": LOOP, "vs_foreach": FOREACH, "vs_sgd": SGD, "vs_adamw": ADAMW}

Step = Callable[[], None]


class Skip(Exception):
    """This contender cannot run on these tensors; the message says why."""


class NotHere(Skip):
    """This contender is not meant for this preset: the runner records no row for it."""


@dataclass
class Settings:
    """What every contender's step uses."""

    lr: float = 0.01
    adamw_lr: float = 1e-3
    p_bound: Optional[float] = None
    compile_max_tensors: int = 400
    compile_presets: Optional[Sequence[str]] = None  # None: every preset (within compile_max_tensors)


@dataclass
class Contender:
    name: str
    #: fp32 bytes per parameter the algorithm needs (the GB/s yardstick) and the design moves.
    work: float
    traffic: float
    build: Callable[[List[torch.Tensor], "Context"], Step]
    about: str = ""


@dataclass
class Context:
    preset: str
    settings: Settings
    notes: List[str] = field(default_factory=list)
    #: What a contender shares between the parameter sets of one preset (a compiled function).
    shared: dict = field(default_factory=dict)


def _fromage_backend(name: str) -> Contender:
    def build(params, ctx):
        backend = _backends.get(name)
        if not backend.supports_dtype(params[0].dtype):
            ctx.notes.append(f"backend {name} does not take {params[0].dtype}: the step falls back to foreach")
        opt = Fromage(params, lr=ctx.settings.lr, p_bound=ctx.settings.p_bound, backend=name)
        return opt.step

    design = {"reference": traffic.REFERENCE, "foreach": traffic.FOREACH}.get(name, traffic.FROMAGE_TWO_PHASE)
    return Contender(f"fromage:{name}", traffic.FROMAGE_TWO_PHASE, design, build, f"Fromage(backend={name!r})")


def _loop(params, ctx):
    return LoopFromage(params, lr=ctx.settings.lr, p_bound=ctx.settings.p_bound).step


def _compiled_foreach(p_bound):
    # The backend is looked up here, not in the compiled function, so the registry is not traced.
    foreach = _backends.get("foreach")

    def foreach_step(params, grads, max_norm, lr):
        stats = phases.stats(foreach, params, grads, inner=p_bound is not None)
        phases.apply(foreach, params, grads, stats, lr=lr, max_norm=max_norm, p_bound=p_bound, maximize=False)

    return torch.compile(foreach_step)


def _compile(params, ctx):
    s = ctx.settings
    if s.compile_presets is not None and ctx.preset not in s.compile_presets:
        where = f"only on {', '.join(s.compile_presets)}" if s.compile_presets else "on no preset"
        raise Skip(f"torch.compile runs {where} in this mode (minutes per preset); choose with --compile-presets")
    if len(params) > s.compile_max_tensors:
        raise Skip(f"{len(params)} tensors > --compile-max-tensors {s.compile_max_tensors} (tracing takes too long)")
    device = params[0].device
    acc = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    lr = torch.tensor(s.lr, dtype=acc, device=device)
    grads = [p.grad for p in params]
    max_norm = torch.full((len(params),), -1.0, device=device) if s.p_bound is not None else None
    fn = ctx.shared.get("compiled")
    if fn is None:
        fn = ctx.shared["compiled"] = _compiled_foreach(s.p_bound)
        # A fresh cache per preset: a recompile for new shapes would otherwise go dynamic-shaped.
        torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    start = time.perf_counter()
    try:
        fn(params, grads, max_norm, lr)
    except Exception as exc:  # any compiler failure is a result to report, not a crash
        raise Skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if not ctx.notes:
        breaks = sum(counters["graph_break"].values())
        ctx.notes.append(f"compiled in {time.perf_counter() - start:.0f} s"
                         + (f", {breaks} graph breaks" if breaks else ""))

    def step():
        fn(params, [p.grad for p in params], max_norm, lr)

    return step


def _torch_optimizer(cls, lr_key):
    def build(params, ctx):
        lr = getattr(ctx.settings, lr_key)
        try:
            opt = cls(params, lr=lr, fused=True)
            opt.step()  # fused support is checked at the first step on some versions
        except (RuntimeError, ValueError) as exc:
            ctx.notes.append(f"fused=True unsupported on {params[0].device.type}/{params[0].dtype} "
                             f"({str(exc).splitlines()[0][:120]}); ran foreach=True")
            opt = cls(params, lr=lr, foreach=True)
        return opt.step

    return build


def _amp(make_optimizer):
    """An AMP step as training loops run it: GradScaler's inf check, the step, the scale update.

    Both optimizers set ``_step_supports_amp_scaling``, so GradScaler skips its unscale pass and
    hands them ``grad_scale`` / ``found_inf``; the gradients stay finite, so no step is skipped.
    """

    def build(params, ctx):
        device = params[0].device
        opt = make_optimizer(params, ctx)
        if not getattr(opt, "_step_supports_amp_scaling", False):
            ctx.notes.append("this optimizer lets GradScaler unscale the gradients first")
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16, growth_interval=10 ** 9)
        scaler.scale(torch.ones((), device=device))  # creates the scale tensor on the device

        def step():
            scaler.step(opt)
            scaler.update()

        return step

    return build


def _amp_fromage(params, ctx):
    return Fromage(params, lr=ctx.settings.lr, p_bound=ctx.settings.p_bound)


def _amp_adamw(params, ctx):
    return torch.optim.AdamW(params, lr=ctx.settings.adamw_lr, fused=True)


def all_contenders(device, settings: Settings, presets: Sequence[str] = ()) -> List[Contender]:
    """Every contender for ``device``, the baselines included, in report order; with the
    host-overhead preset among ``presets``, also its host-work contenders (see ``host.py``)."""
    p_bound = settings.p_bound is not None
    found = [Contender(LOOP, traffic.FROMAGE_TWO_PHASE, traffic.LOOP + (traffic.LOOP_BOUND_NORM if p_bound else 0),
                       _loop, "per-tensor loop with host syncs, as users run it today")]
    for name in available_backends(device):
        c = _fromage_backend(name)
        if p_bound and name in ("reference", "foreach"):
            c.traffic += traffic.INNER_PRODUCT
        found.append(c)
    found.append(Contender(COMPILE, traffic.FROMAGE_TWO_PHASE, traffic.FROMAGE_TWO_PHASE, _compile,
                           "torch.compile of the foreach step (nominal traffic: perfectly fused)"))
    found.append(Contender(SGD, traffic.SGD, traffic.SGD, _torch_optimizer(torch.optim.SGD, "lr"),
                           "torch.optim.SGD(fused=True)"))
    found.append(Contender(ADAMW, traffic.ADAMW, traffic.ADAMW, _torch_optimizer(torch.optim.AdamW, "adamw_lr"),
                           "torch.optim.AdamW(fused=True)"))
    amp_fromage = traffic.FROMAGE_TWO_PHASE + traffic.AMP_CHECK
    found.append(Contender(AMP_FROMAGE, amp_fromage, amp_fromage, _amp(_amp_fromage),
                           "GradScaler step + update around Fromage (auto backend)"))
    found.append(Contender(AMP_ADAMW, traffic.ADAMW + traffic.AMP_CHECK, traffic.ADAMW + traffic.AMP_CHECK,
                           _amp(_amp_adamw), "GradScaler step + update around AdamW(fused=True)"))
    found += layerwise.contenders_for(device, settings, sys.modules[__name__])
    if host.PRESET in presets:
        found += host.contenders_for(device, settings, sys.modules[__name__])
    return found


def select(contenders: Sequence[Contender], patterns: Optional[Sequence[str]]) -> List[Contender]:
    """The contenders matching any of ``patterns`` (names or shell patterns such as ``fromage:*``),
    in the order of the patterns (a run cut off by a time limit has measured the first ones), and in
    report order among those a pattern matches."""
    if not patterns:
        return list(contenders)
    names = [c.name for c in contenders]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"no contender matches {pattern!r} here; choose from {names}")
    chosen = [c for c in contenders if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    first = {c.name: next(i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(c.name, p)) for c in chosen}
    return sorted(chosen, key=lambda c: first[c.name])
