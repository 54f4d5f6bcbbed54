"""LAMB on the foreach backend: ``torch._foreach_*`` over a group, every scalar kept on the device.

No tensor value is read on the host: the step count, the bias corrections, the clip divisor, lr,
the trust ratio, the caution share and the ``found_inf`` / unusable-lr skip are tensor ops; the
Python branches read only the flags and the group's Python numbers (betas, eps, weight_decay,
max_lr_snapshot: never tensors). Per tensor, in the accumulation dtype (bf16/fp16 parameters are
upcast and rounded once; the moments are of the accumulation dtype), each product and sum rounded
on its own (no ``addcmul``, which torch may fuse), in the oracle's order:

    ĝ = g / (grad_scale·c)
    m = β1·m + β3·ĝ                       v = β2·v + ((1 − β2)·ĝ)·ĝ
    u = (m / bc1) / (√v / √bc2 + eps)     bc = −expm1(t·ln β): ln β from the host in float64
    k = max(sign(u·ĝ), 0)                 (caution)
    p = p − s·wd·p                        (decoupled decay)
    p = p − (lr·r)·(u·k / share + wd·p)   (k, share, wd·p and r as the options say)

The moments and apply passes compute u by the same operations from the same m and v, so apply's u
is the one whose norm moments measured. Tensors go in runs of whole tensors whose temporaries stay
within the backend's budget (``backends/foreach.py``); norms on CPU over pieces combined as a tree.
"""
from __future__ import annotations

import math

import torch

from ...backends import foreach as _fe
from ...engine.dtypes import accumulate_dtype
from ...engine.rounding import stochastic_round_bf16
from ...engine.spec import usable_lr
from . import passes
from .flags import ADAPT, BIAS_CORRECTION, CAUTION, CLIP, CORRECTED_WEIGHT_DECAY, DECOUPLED_DECAY, GRAD_AVERAGING, \
    TRUST_CLIP
from .passes import AA, AGREE, AP, PP, sums_inner
from .reference import CAUTION_FLOOR

# the packed hyper-parameters' slot of lr (LAMB_RULE.spec.slots), the only one read from the device
LR = 0


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # β = 0: β^t = 0 for every t >= 1


class _Step:
    """The step's scalars for one group: the group's Python numbers, and 0-d device tensors for
    everything that depends on lr, the step count, grad_scale or the clip divisor."""

    def __init__(self, call):
        values, flags = call.values, call.flags
        self.flags = flags
        acc = self.acc = accumulate_dtype(call.dtype)
        self.low = call.dtype != acc
        self.width = torch.finfo(acc).bits // 8
        lr = self.lr = call.hyper[LR]
        self.b1, self.b2 = (float(b) for b in values["betas"])
        self.into_m = 1 - self.b1 if flags & GRAD_AVERAGING else 1.0
        self.eps = float(values["eps"])
        divisor = None if call.grad_scale is None else call.grad_scale.to(acc)
        if flags & CLIP:
            clip = call.globals.to(device=call.device, dtype=acc)
            divisor = clip if divisor is None else divisor * clip
        self.divisor = divisor
        self.c1 = self.sqrt_c2 = None
        if flags & BIAS_CORRECTION:
            t = call.counters["step"].to(acc) + 1  # the count after this step
            self.c1 = -torch.expm1(t * _log(self.b1))
            self.sqrt_c2 = (-torch.expm1(t * _log(self.b2))).sqrt()
        wd = float(values["weight_decay"])
        decoupled = bool(flags & DECOUPLED_DECAY) and wd != 0
        self.coupled = 0.0 if decoupled else wd  # the decay term inside u
        self.decay = None  # p <- p - decay·p
        if decoupled:
            shrink = lr * lr / float(values["max_lr_snapshot"]) if flags & CORRECTED_WEIGHT_DECAY else lr
            self.decay = shrink * wd
        # A skip (found_inf, or a tensor lr edited to an unusable value) selects the old values of
        # everything written; a Python-number lr was checked when the plan read it.
        keep = usable_lr(lr) if isinstance(values["lr"], torch.Tensor) else None
        if call.found_inf is not None:
            keep = (call.found_inf == 0) if keep is None else keep & (call.found_inf == 0)
        self.keep = keep

    def grads(self, grads):
        """ĝ in the accumulation dtype (a new list: the caller's gradients are never written)."""
        if self.low:
            out = [g.to(self.acc) for g in grads]
            if self.divisor is not None:
                torch._foreach_div_(out, self.divisor)
            return out
        return list(grads) if self.divisor is None else torch._foreach_div(grads, self.divisor)

    def moments(self, exp_avgs, exp_avg_sqs, g):
        """The new m and v (new tensors)."""
        m = torch._foreach_mul(exp_avgs, self.b1)
        torch._foreach_add_(m, torch._foreach_mul(g, self.into_m))
        v = torch._foreach_mul(exp_avg_sqs, self.b2)
        torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(g, 1 - self.b2), g))
        return m, v

    def update(self, m, v):
        den = torch._foreach_sqrt(v)
        if self.sqrt_c2 is not None:
            torch._foreach_div_(den, self.sqrt_c2)
        torch._foreach_add_(den, self.eps)
        if self.c1 is None:
            return torch._foreach_div(m, den)
        u = torch._foreach_div(m, self.c1)
        torch._foreach_div_(u, den)
        return u

    @staticmethod
    def mask(u, g):
        """k = [u·ĝ > 0] as 1 or 0 (sign, then the negatives to 0)."""
        k = torch._foreach_sign(torch._foreach_mul(u, g))
        torch._foreach_clamp_min_(k, 0.0)
        return k


def kernel_globals(call) -> torch.Tensor:
    """The step's per-group values the C++ and CUDA kernels read (``csrc/rule_lamb.h``, ``Global``):
    the gradients' divisor, ``1 − β1^t``, ``√(1 − β2^t)``, the decoupled decay's factor, and the
    moments' weights of the new gradient; computed as this backend computes them, as float32."""
    s = _Step(call)
    parts = []
    for x, default in ((s.divisor, 1.0), (s.c1, 1.0), (s.sqrt_c2, 1.0), (s.decay, 0.0), (s.into_m, None),
                       (1 - s.b2, None)):
        if isinstance(x, torch.Tensor):
            parts.append(x.reshape(()).to(torch.float32))
        else:
            # fills, not copies from the host: this may run during CUDA-graph capture
            parts.append(torch.full((), default if x is None else x, dtype=torch.float32, device=call.device))
    return torch.stack(parts)


def _square_norms(tensors, acc) -> torch.Tensor:
    """``[n]``: ‖t‖² per tensor; on CPU over pieces combined as a tree (backends/foreach.py)."""
    norms, owner = [], []
    for run in _fe.runs(tensors, tensors, 0, piece=_fe.norm_piece(tensors)):
        norms += torch._foreach_norm(run.params, 2, dtype=acc)
        owner += run.owner
    return _fe.combine(torch.stack(norms).square(), owner, len(tensors))


def _inner(a, b, acc) -> torch.Tensor:
    """``[n]``: ⟨a, b⟩ per tensor, as sum(x) = 2·sum(max(x, 0)) − sum(|x|) over the products."""
    x = torch._foreach_mul(a, b)
    totals = torch.stack(torch._foreach_norm(x, 1, dtype=acc))
    torch._foreach_clamp_min_(x, 0.0)
    positives = torch.stack(torch._foreach_norm(x, 1, dtype=acc))
    return 2 * positives - totals


def _elements(tensors, acc, device) -> torch.Tensor:
    """``[n]``: each tensor's element count, made once per plan's list (a sum: a sharded tensor's
    counts add up to the whole tensor's over its ranks)."""
    memo = getattr(tensors, "memo", None)
    key = ("lamb_elements", acc, device)
    if memo is not None and key in memo:
        return memo[key]
    out = torch.tensor([t.numel() for t in tensors], dtype=acc).to(device)
    if memo is not None:
        memo[key] = out
    return out


def _rounded(work, owner, seed):
    """The new bf16 parameters rounded stochastically where the group asks for it (``seed``: it is
    None otherwise); whole tensors, so each element's index is its index in its tensor."""
    return work if seed is None else [stochastic_round_bf16(w, seed, i) for w, i in zip(work, owner)]


def grad_norm(grads, call) -> torch.Tensor:
    """``[n, 1]``: ‖g / grad_scale‖² (only with ``max_grad_norm``: the pass's ``when``)."""
    acc = accumulate_dtype(call.dtype)
    sums = _square_norms(grads, acc)
    if call.grad_scale is not None:
        scale = call.grad_scale.to(acc)
        sums = sums / scale / scale  # (not by scale²: it may overflow)
    return sums.reshape(-1, 1)


def moments(exp_avgs, exp_avg_sqs, params, grads, call) -> torch.Tensor:
    s = _Step(call)
    acc, n = s.acc, len(grads)
    caution, adapt = bool(s.flags & CAUTION), bool(s.flags & ADAPT)
    inner = adapt and sums_inner(s.flags, s.coupled)
    columns = {name: [] for name in (PP, AA, AP, AGREE)}
    for run in _fe.runs(grads, grads, 9 * s.width, split=False):
        idx = run.owner
        m, v = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        g = s.grads(run.grads)
        m_new, v_new = s.moments(m, v, g)
        a = s.update(m_new, v_new)
        p = None
        if adapt:
            p = [params[i] for i in idx]
            if s.low:
                p = [x.to(acc) for x in p]
            columns[PP].append(_square_norms(p, acc))
        if caution:
            k = s.mask(a, g)
            torch._foreach_mul_(a, k)
            columns[AGREE].append(torch.stack(torch._foreach_norm(k, 1, dtype=acc)))
            del k
        elif s.coupled != 0:
            torch._foreach_add_(a, torch._foreach_mul(p, s.coupled))
        if inner:
            columns[AP].append(_inner(a, p, acc))
        columns[AA].append(_square_norms(a, acc))
        _fe.write_kept(m, m_new, s.keep)
        _fe.write_kept(v, v_new, s.keep)
        del g, m_new, v_new, a, p
    zeros = torch.zeros(n, dtype=acc, device=call.device)
    out = [torch.cat(columns[c]) if columns[c] else zeros for c in (PP, AA, AP, AGREE)]
    out.append(_elements(exp_avgs, acc, call.device) if caution else zeros)
    return torch.stack(out, dim=1)


def _coefficients(s: _Step, sums):
    """``(step, share)``, ``[n]`` each: p moves by ``step·(u·k / share + wd·p)``; ``step`` is lr·r
    (lr when not adapting: then None, lr is used as it is), ``share`` None without caution."""
    s_pp, s_aa, s_ap, agree, elements = sums.unbind(1)
    share = None
    if s.flags & CAUTION:
        share = torch.where(elements > 0, torch.clamp(agree / elements, min=CAUTION_FLOOR), 1.0)
    if not s.flags & ADAPT:
        return None, share
    p_norm = s_pp.sqrt()
    if s.decay is not None:
        p_norm = p_norm * (1 - s.decay).abs()  # ‖p‖ after the decoupled decay
    if share is not None:
        u_sq = s_aa / (share * share) + 2 * s.coupled * s_ap / share + s.coupled * s.coupled * s_pp
        u_norm = torch.clamp(u_sq, min=0.0).sqrt()
    else:
        u_norm = s_aa.sqrt()
    ratio = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, 1.0)
    if s.flags & TRUST_CLIP:
        ratio = torch.clamp(ratio, max=1.0)
    return s.lr * ratio, share


def apply(params, exp_avgs, exp_avg_sqs, grads, call) -> None:
    s = _Step(call)
    acc = s.acc
    step, share = _coefficients(s, call.sums)
    columns = [c.to(acc) for c in (step, share) if c is not None]
    views = _fe.column_views(torch.stack(columns, dim=1)) if columns else []
    v_step = views[0] if step is not None else None
    v_share = views[-1] if share is not None else None
    whole = len(params)
    # Whether the new p goes to copies first (upcast, or kept only where the step is applied).
    copied = s.low or s.keep is not None
    for run in _fe.runs(params, params, 8 * s.width, split=False):
        def pick(views, owner=run.owner):
            return views if len(owner) == whole else [views[i] for i in owner]

        idx = run.owner
        u = s.update([exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx])
        if v_share is not None:
            g = s.grads([grads[i] for i in idx])
            torch._foreach_mul_(u, s.mask(u, g))
            torch._foreach_div_(u, pick(v_share))
            del g
        work = [p.to(acc, copy=True) for p in run.params] if copied else run.params
        if s.coupled != 0:
            torch._foreach_add_(u, torch._foreach_mul(work, s.coupled))
        if s.decay is not None:
            torch._foreach_sub_(work, torch._foreach_mul(work, s.decay))
        torch._foreach_sub_(work, torch._foreach_mul(u, pick(v_step) if v_step is not None else s.lr))
        if copied:
            _fe.write_kept(run.params, _rounded(work, run.owner, call.seed), s.keep)
        del u, work


def adam(params, exp_avgs, exp_avg_sqs, grads, call) -> None:
    """Neither adapting nor cautious (so no weight decay): Adam with the clipped gradient, one pass."""
    s = _Step(call)
    copied = s.low or s.keep is not None
    for run in _fe.runs(params, grads, 8 * s.width, split=False):
        idx = run.owner
        m, v = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        m_new, v_new = s.moments(m, v, s.grads(run.grads))
        u = s.update(m_new, v_new)
        work = [p.to(s.acc, copy=True) for p in run.params] if copied else run.params
        torch._foreach_sub_(work, torch._foreach_mul(u, s.lr))
        _fe.write_kept(m, m_new, s.keep)
        _fe.write_kept(v, v_new, s.keep)
        if copied:
            _fe.write_kept(run.params, _rounded(work, run.owner, call.seed), s.keep)
        del m_new, v_new, u, work


class Foreach:
    """The passes for ``backends/foreach.py``."""

    @staticmethod
    def run_pass(index: int, call):
        return passes.run_pass(index, call, grad_norm, moments, apply, adam)
