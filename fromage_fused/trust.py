"""Distances between two networks with the same architecture, and the descent lemma's step bound.

Deep relative trust (Bernstein et al. 2020, Theorem 1 and Modelling assumption 1) measures how far
network ``b`` is from network ``a`` by the relative change of each layer, compounded over depth::

    deep_relative_trust(a, b) = prod_k (1 + ||W_k^b - W_k^a|| / ||W_k^a||) - 1

Both functions run the stats phase of the optimizer's backends: per (device, dtype) group, one
``_foreach_sub`` and one stats call give ``||W^a||^2`` and ``||W^b - W^a||^2`` of every tensor,
and the result stays on the device (nothing is read on the host until the caller reads it).

A tensor with ``||W^a|| = 0`` (a zero-initialised bias, an empty tensor) has relative change 0 if
it did not change and ``inf`` if it did: any change of a zero tensor is infinitely large relative
to it. To leave such tensors out, pass only the ones that matter, e.g. the weight matrices
``[p for p in model.parameters() if p.dim() > 1]``. The norms come from sums of squares in the
stats precision (fp32 for fp32/bf16/fp16 tensors), so a tensor whose norm is below about 1e-19
counts as zero there.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, List, Union

import torch

from .functional import plan

__all__ = ["deep_relative_trust", "relative_changes", "max_safe_lr"]

Params = Union[torch.nn.Module, Iterable[torch.Tensor]]


def _tensors(params: Params, name: str) -> List[torch.Tensor]:
    if isinstance(params, torch.nn.Module):
        return list(params.parameters())
    if isinstance(params, torch.Tensor):
        raise ValueError(f"{name} must be a module or a list of tensors, not a single tensor; wrap it in a list")
    try:
        tensors = list(params)
    except TypeError:
        raise ValueError(f"{name} must be a module or an iterable of tensors, got {type(params).__name__}") from None
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
    return tensors


def _pairs(params_a: Params, params_b: Params):
    a, b = _tensors(params_a, "params_a"), _tensors(params_b, "params_b")
    if len(a) != len(b):
        raise ValueError(f"params_a has {len(a)} tensors but params_b has {len(b)}; the networks must match tensor for tensor")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"tensor {i} has shape {tuple(x.shape)} in params_a but {tuple(y.shape)} in params_b")
        for t, name in ((x, "params_a"), (y, "params_b")):
            if not (t.is_floating_point() or t.is_complex()):
                raise ValueError(f"tensor {i} of {name} has dtype {t.dtype}; only floating-point and complex tensors have a norm here")
            if t.layout != torch.strided:
                raise ValueError(f"tensor {i} of {name} is {t.layout}; only dense tensors are supported")
    a = [x.detach() for x in a]
    # b is compared in a's dtype and on a's device (a snapshot kept on the CPU, say).
    b = [y.detach().to(device=x.device, dtype=x.dtype) for x, y in zip(a, b)]
    return a, b


@torch.no_grad()
def relative_changes(params_a: Params, params_b: Params, *, backend: str = "auto") -> torch.Tensor:
    """Per tensor ``||W^b - W^a|| / ||W^a||``, as a 1-D tensor in the order of ``params_a``.

    ``params_a``, ``params_b``: two modules, or two lists of tensors, matching tensor for tensor
    (``ValueError`` otherwise). ``b`` is cast to each ``a`` tensor's dtype and device. The result
    lives on the device of the first tensor, in float64 if any group is float64, else float32;
    a tensor with ``||W^a|| = 0`` gives 0 if unchanged and ``inf`` otherwise. After one Fromage
    step of learning rate ``lr`` (without ``p_bound``), each entry is about ``lr`` (paper eq. 6).
    """
    a, b = _pairs(params_a, params_b)
    if not a:
        return torch.zeros(0)
    out_device = a[0].device
    results = []
    for group in plan(a, b, None, backend=backend):
        a_g, b_g = group.params, group.grads
        if a_g[0].dtype in (torch.bfloat16, torch.float16):
            # A difference rounded to 8 or 11 bits would cost its norm ~1e-3 relative accuracy.
            a_g, b_g = [x.float() for x in a_g], [y.float() for y in b_g]
        diff = torch._foreach_sub(b_g, a_g)
        stats = group.backend.stats(a_g, diff, inner=False)
        s_aa, s_dd = stats[:, 0], stats[:, 1]
        ratio = (s_dd / s_aa).sqrt()
        zero = torch.where(s_dd > 0, torch.full_like(s_dd, math.inf), torch.zeros_like(s_dd))
        results.append((group.indices, torch.where(s_aa > 0, ratio, zero)))
    dtype = torch.float64 if any(r.dtype == torch.float64 for _, r in results) else torch.float32
    out = torch.empty(len(a), dtype=dtype, device=out_device)
    for indices, r in results:
        # A group on another device than the first tensor is copied back (a blocking copy).
        out.index_copy_(0, torch.tensor(indices, device=out_device), r.to(device=out_device, dtype=dtype))
    return out


@torch.no_grad()
def deep_relative_trust(params_a: Params, params_b: Params, *, backend: str = "auto") -> torch.Tensor:
    """``prod_k (1 + ||W_k^b - W_k^a|| / ||W_k^a||) - 1`` over matching tensors, as a 0-d tensor.

    Computed as ``expm1(sum(log1p(r_k)))`` so that small distances keep their precision. Same
    inputs, device and zero-norm convention as :func:`relative_changes` (a changed zero tensor
    makes the distance ``inf``); no tensors give 0.
    """
    return torch.expm1(torch.log1p(relative_changes(params_a, params_b, backend=backend)).sum())


def max_safe_lr(depth: int, cos_theta: float = 1.0) -> float:
    """The descent lemma's bound on the relative step: ``(1 + cos_theta) ** (1 / depth) - 1``.

    For a network of ``depth`` layers, perturbing every layer by a relative amount ``lr`` along
    its gradient (as Fromage does) decreases the loss if ``lr`` is below this bound, where
    ``cos_theta`` is the cosine of the angle between the full gradient and the perturbation
    (Lemma 2; 1 for a step straight down the gradient). The bound shrinks like ``log(2)/depth``.
    For ``cos_theta <= 0`` it is ``<= 0``: no step size is guaranteed to descend.
    """
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    if isinstance(cos_theta, bool) or not isinstance(cos_theta, numbers.Real):
        raise ValueError(f"cos_theta must be a real number in [-1, 1], got {cos_theta!r}")
    cos_theta = float(cos_theta)
    if not -1.0 <= cos_theta <= 1.0:  # also rejects nan
        raise ValueError(f"cos_theta must be in [-1, 1], got {cos_theta!r}")
    if cos_theta == -1.0:
        return -1.0
    return math.expm1(math.log1p(cos_theta) / int(depth))
