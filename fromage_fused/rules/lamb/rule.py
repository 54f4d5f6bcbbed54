"""The LAMB rule (You et al. 2019, as timm's ``Lamb``; docs/lars_lamb_semantics.md): its
hyper-parameters, state and passes.

Once per step, over every gradient of every param group (``max_grad_norm`` not None):

    c = max(‖g‖ / max_grad_norm, 1)        ‖g‖ the norm of all of them together, g = grad / grad_scale

then per group, with t its step count after this step (advanced whether or not it has gradients),
bc1 = 1 − β1^t, bc2 = 1 − β2^t (1 without bias_correction), β3 = 1 − β1 (1 without
grad_averaging), and per parameter with a gradient:

    ĝ = g / c
    m ← β1·m + β3·ĝ,   v ← β2·v + (1 − β2)·ĝ²
    u = (m / bc1) / (√v / √bc2 + eps)
    if caution:  k = [u·ĝ > 0],  u ← u·k / max(mean(k), 1e-3)
    if weight_decay ≠ 0:
        decoupled_decay:  p ← (1 − s·weight_decay)·p,   s = lr²/max_lr_snapshot if corrected_weight_decay else lr
        otherwise:        u ← u + weight_decay·p
    if weight_decay ≠ 0 or always_adapt:
        r = ‖p‖ / ‖u‖ (1 if either is 0),  r ← min(r, 1) with trust_clip,  u ← r·u
    p ← p − lr·u

The passes, and what each reads (r) and writes (w), in bytes per fp32 parameter:

- ``grad_norm`` (with ``max_grad_norm``): r g; sums ‖g/grad_scale‖², which :meth:`LambRule.combine`
  adds over every group into ``c`` (4 bytes).
- ``moments`` (when adapting or with caution): r m, v, g, p (p only when adapting); w m, v; sums,
  per tensor (``passes.PP``...): ‖p‖², ‖a‖², ⟨a, p⟩, Σk and the element count, where a = u + wd·p
  (u with a decoupled decay or no decay) without caution and a = u·k with it. ‖u‖ after caution is
  then √(‖a‖²/share² + 2·wd·⟨a, p⟩/share + wd²·‖p‖²) (share = max(Σk / count, 1e-3); wd = 0
  unless the decay is coupled): share is known only at the end of the pass. A decoupled decay
  scales p by a number, so ‖p‖ after it is |1 − s·wd|·‖p‖ (24 bytes).
- ``apply`` (after ``moments``): r p, m, v (and g with caution, for k); w p. u is computed again
  from the new m and v by the same operations as in ``moments``, so it is the same u (16 + 4 bytes).
- ``adam`` (neither adapting nor cautious: weight_decay is 0): r g, p, m, v; w m, v, p (28 bytes).

So 40 bytes per fp32 parameter adapting, 44 with ``max_grad_norm`` (the default), 28 + 4 as Adam.
The step count is a 0-d float32 tensor in the param group (``step``, as timm keeps it), on the
device of the group's first parameter; passes read it as it was before the step.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from ...engine.rounding import SR_SEED, STOCHASTIC_ROUNDING
from ...engine.rule import Buffer, GroupScalar, Pass, Rule
from ...engine.spec import Spec, check_lr, check_non_negative, check_positive_or_none, flag, option, real, value
from . import passes
from .flags import ADAPT, CAUTION, CLIP, MONITOR, NORMS, PLAIN
from .foreach import Foreach
from .reference import Reference

__all__ = ["LAMB_RULE", "LambRule", "check_corrected", "same_max_grad_norm"]


def _check_betas(name: str, betas, read_tensor: bool = True) -> None:
    # A list too: configurations read from JSON or YAML hold one.
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid betas: {betas!r} (must be a pair of numbers in [0, 1))")
    for b in betas:
        v = real(b)
        if v is None or not 0.0 <= v < 1.0:
            raise ValueError(f"invalid betas: {betas!r} (each must be a number in [0, 1))")


def check_corrected(values: Mapping[str, Any]) -> None:
    """timm's condition: corrected weight decay divides by the snapshot of the constructor's lr,
    which must then be > 0."""
    if values["corrected_weight_decay"] and not real(values["max_lr_snapshot"]) > 0:
        raise ValueError("corrected_weight_decay divides by the lr the optimizer was constructed with "
                         f"(max_lr_snapshot={values['max_lr_snapshot']!r}); it must be > 0: construct the "
                         "optimizer with the peak lr")


def same_max_grad_norm(a, b) -> bool:
    return (a is None) == (b is None) and (a is None or real(a) == real(b))


def adapts(values: Mapping[str, Any]) -> bool:
    return real(values["weight_decay"]) != 0 or values["always_adapt"] is True


class LambRule(Rule):
    name = "lamb"
    title = "LAMB"
    # timm's names, defaults and order (its signature's), then the snapshot timm keeps in every group
    spec = Spec(
        value("lr", 1e-3, check_lr, tensor=True),
        flag("bias_correction", True),
        value("betas", (0.9, 0.999), _check_betas, width=2),
        value("eps", 1e-6, check_non_negative),
        value("weight_decay", 0.01, check_non_negative),
        flag("grad_averaging", True),
        # global: every group holds the constructor's value (checked by check_groups)
        option("max_grad_norm", 1.0, check_positive_or_none),
        flag("trust_clip", False),
        flag("always_adapt", False),
        flag("caution", False),
        flag("decoupled_decay", False),
        flag("corrected_weight_decay", False),
        # the constructor's lr as a float, corrected weight decay's max_lr (timm's name and place)
        option("max_lr_snapshot", 1e-3, check_non_negative),
        STOCHASTIC_ROUNDING,  # this package's: bf16 parameters rounded stochastically (seeded)
    )
    state = (Buffer("exp_avg"), Buffer("exp_avg_sq"),
             GroupScalar("step", torch.float32, anchor=lambda p: True, when=lambda values, dtype: True,
                         initial=lambda opt, index, device: 0, where="group"), SR_SEED)
    passes = (
        Pass("grad_norm", lists=("g",), sums=1, combine=True, when=CLIP | MONITOR),
        Pass("moments", lists=("exp_avg", "exp_avg_sq", "p", "g"), writes=2, sums=5, optional=(("p", ADAPT),),
             when=NORMS),
        Pass("apply", lists=("p", "exp_avg", "exp_avg_sq", "g"), writes=1, optional=(("g", CAUTION),), when=NORMS),
        Pass("adam", lists=("p", "exp_avg", "exp_avg_sq", "g"), writes=3, when=PLAIN),
    )
    reference = Reference()
    foreach = Foreach()

    def flags(self, values, monitor: bool) -> int:
        bits = self.spec.flags(values)
        if values["max_grad_norm"] is not None:
            bits |= CLIP
        if adapts(values):
            bits |= ADAPT
        # A group that rounds stochastically runs the moments and update passes even as Adam: the
        # one-pass Adam kernel writes three lists and has no registers left for the rounding's hash.
        bits |= NORMS if bits & (ADAPT | CAUTION) or values.get("stochastic_rounding") is True else PLAIN
        if monitor:
            bits |= MONITOR
        return bits

    def summarize(self, record):
        from .monitor import summarize

        return summarize(record)

    def kernel_globals(self, call) -> Optional[torch.Tensor]:
        # grad_norm reads none (the clip divisor is what it produces)
        if call.index == passes.GRAD_NORM:
            return None
        # the same for the moments and update passes of a step: computed once (a dozen small ops)
        if "kernel_globals" not in call.memo:
            from .foreach import kernel_globals

            call.memo["kernel_globals"] = kernel_globals(call)
        return call.memo["kernel_globals"]

    def check_groups(self, groups: Sequence[Mapping[str, Any]]) -> None:
        first = groups[0]["max_grad_norm"] if groups else None
        if not all(same_max_grad_norm(g["max_grad_norm"], first) for g in groups):
            held = [g["max_grad_norm"] for g in groups]
            raise ValueError(f"max_grad_norm clips the gradients of all param groups together, but the groups hold "
                             f"different values ({held}): set the same value in every group")
        for g in groups:
            check_corrected(g)

    def combine(self, index: int, sums: Sequence[torch.Tensor], groups) -> torch.Tensor:
        """The clip divisor ``max(‖g‖ / max_grad_norm, 1)``, ‖g‖ over every group's gradients, on the
        device of the first group (float64 if any group computes in it)."""
        max_grad_norm = groups[0].values["max_grad_norm"]
        if max_grad_norm is None:
            return None
        dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
        device = sums[0].device
        total = torch.stack([s.sum().to(device=device, dtype=dtype) for s in sums]).sum()
        return torch.clamp(total.sqrt() / float(max_grad_norm), min=1.0)


LAMB_RULE = LambRule()
