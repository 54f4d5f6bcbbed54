"""Distances between two networks with the same architecture, the descent lemma's step bound, and
Figure 1's probe of how far a step along the gradient can be trusted.

Deep relative trust (Bernstein et al. 2020, Theorem 1 and Modelling assumption 1) measures how far
network ``b`` is from network ``a`` by the relative change of each layer, compounded over depth::

    deep_relative_trust(a, b) = prod_k (1 + ||W_k^b - W_k^a|| / ||W_k^a||) - 1

The paper's layers are the weight matrices; ``matrices_only=True`` leaves out every tensor of fewer
than two dimensions (biases, normalisation scales), which otherwise inflate the product.

The distances are exact over every finite input, from the smallest subnormal to the largest
finite float, even where ``||W||^2`` itself would overflow or underflow: float32, bf16 and fp16
tensors (the optimizer's stats phase squares them in float32, which overflows above a norm of
about 1.8e19) are measured in float64, where their squares always fit; float64 tensors are scaled
by a power of two (exact) so that their largest element lies in [0.5, 1) before squaring, and
their difference is taken between tensors scaled alike. One tensor at a time, so the extra memory
is that of the largest tensor's float64 copies. Measured on a CPU (8M parameters in 161 tensors),
that takes 1.6 times (float32) and 3.6 times (float64) as long as the optimizer's stats phase
over the same differences. Nothing is read on the host: the results stay on the device until the
caller reads them.

A tensor with ``||W^a|| = 0`` (a zero-initialised bias, an empty tensor) has relative change 0 if
it did not change and ``inf`` if it changed at all: any change of a zero tensor is infinitely large
relative to it. An inf or NaN in the inputs gives NaN or inf, never a finite number.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = ["deep_relative_trust", "relative_changes", "max_safe_lr", "count_layers", "gradient_breakdown", "Breakdown"]

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
        raise ValueError(f"params_a has {len(a)} tensors but params_b has {len(b)}; the networks must match tensor for "
                         "tensor")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"tensor {i} has shape {tuple(x.shape)} in params_a but {tuple(y.shape)} in params_b")
        for t, name in ((x, "params_a"), (y, "params_b")):
            if not (t.is_floating_point() or t.is_complex()):
                raise ValueError(f"tensor {i} of {name} has dtype {t.dtype}; only floating-point and complex tensors "
                                 "have a norm here")
            if t.layout != torch.strided:
                raise ValueError(f"tensor {i} of {name} is {t.layout}; only dense tensors are supported")
    a = [x.detach() for x in a]
    # b is compared in a's dtype and on a's device (a snapshot kept on the CPU, say).
    b = [y.detach().to(device=x.device, dtype=x.dtype) for x, y in zip(a, b)]
    return a, b


def _wide(device: torch.device) -> torch.dtype:
    """The dtype in which norms are taken and ratios combined: float64 wherever the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _max_exponent(*tensors: torch.Tensor) -> torch.Tensor:
    """The integer e with max|x| over the tensors in [2^(e-1), 2^e) (0 if all are zero)."""
    extremes = [torch.aminmax(t) for t in tensors]
    top = torch.stack([torch.maximum(-lo, hi) for lo, hi in extremes]).amax()
    return torch.frexp(top).exponent


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2^e as two factors, so that each is representable wherever the product is."""
    half = torch.div(e, 2, rounding_mode="floor")
    return torch.exp2(half.to(dtype)), torch.exp2((e - half).to(dtype))


def _times_pow2(t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``t * 2^e``, exact unless a result is subnormal."""
    f1, f2 = _pow2(e, t.dtype)
    return t * f1 * f2


def _scaled_ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||y - x|| / ||x|| in x's dtype, for any finite values: each tensor is scaled by a power of
    two into [-1, 1] before it is squared, and the difference is taken between tensors scaled
    alike, so nothing overflows and nothing that matters underflows."""
    e_a = _max_exponent(x)
    e_ab = torch.maximum(e_a, _max_exponent(y))
    diff = _times_pow2(y, -e_ab) - _times_pow2(x, -e_ab)
    e_d = _max_exponent(diff)
    n_a = torch.linalg.vector_norm(_times_pow2(x, -e_a))
    n_d = torch.linalg.vector_norm(_times_pow2(diff, -e_d))
    f1, f2 = _pow2(e_ab + e_d - e_a, x.dtype)
    return _zero_convention(n_a, n_d, n_d / n_a * f1 * f2)


def _zero_convention(n_a: torch.Tensor, n_d: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """A zero tensor: 0 if unchanged, inf if changed; NaN stays NaN."""
    zero = torch.where(n_d == 0, torch.zeros_like(n_d), n_d * math.inf)
    return torch.where(n_a == 0, zero, ratio)


def _ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One tensor's relative change as a 0-d tensor in the wide dtype, on x's device."""
    if x.is_complex():
        x, y = torch.view_as_real(x), torch.view_as_real(y)
    wide = _wide(x.device)
    if x.numel() == 0:
        return torch.zeros((), dtype=wide, device=x.device)
    if x.dtype == wide or x.dtype == torch.float64:
        return _scaled_ratio(x, y).to(wide)
    # float32/bf16/fp16 values squared in float64 can neither overflow nor underflow, and their
    # difference in float64 is correctly rounded: the plain definition is exact enough.
    x64, y64 = x.to(wide), y.to(wide)
    n_a = torch.linalg.vector_norm(x64)
    n_d = torch.linalg.vector_norm(y64 - x64)
    return _zero_convention(n_a, n_d, n_d / n_a)


def _ratios(a: List[torch.Tensor], b: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.dtype]:
    """Relative changes in the wide dtype on a's first device, and the dtype the caller returns."""
    out_device = a[0].device
    wide = _wide(out_device)
    by_device = {}
    for i, (x, y) in enumerate(zip(a, b)):
        by_device.setdefault(x.device, []).append((i, _ratio(x, y)))
    out = torch.empty(len(a), dtype=wide, device=out_device)
    for device, items in by_device.items():
        index = torch.tensor([i for i, _ in items], device=out_device)
        # A tensor on another device than the first is copied back once per device (a blocking copy).
        out.index_copy_(0, index, torch.stack([r for _, r in items]).to(device=out_device, dtype=wide))
    any64 = any(x.dtype in (torch.float64, torch.complex128) for x in a)
    return out, (torch.float64 if any64 and wide == torch.float64 else torch.float32)


@torch.no_grad()
def relative_changes(params_a: Params, params_b: Params) -> torch.Tensor:
    """Per tensor ``||W^b - W^a|| / ||W^a||``, as a 1-D tensor in the order of ``params_a``.

    ``params_a``, ``params_b``: two modules, or two lists of tensors, matching tensor for tensor
    (``ValueError`` otherwise). ``b`` is cast to each ``a`` tensor's dtype and device. The result
    lives on the device of the first tensor, in float64 if any group is float64, else float32
    (a ratio beyond float32's range is ``inf`` there); a tensor with ``||W^a|| = 0`` gives 0 if
    unchanged and ``inf`` otherwise. After one Fromage step of learning rate ``lr`` (without
    ``p_bound``), each entry is about ``lr`` (paper eq. 6).
    """
    a, b = _pairs(params_a, params_b)
    if not a:
        return torch.zeros(0)
    ratios, dtype = _ratios(a, b)
    return ratios.to(dtype)


@torch.no_grad()
def deep_relative_trust(params_a: Params, params_b: Params, *, matrices_only: bool = False) -> torch.Tensor:
    """``prod_k (1 + ||W_k^b - W_k^a|| / ||W_k^a||) - 1`` over matching tensors, as a 0-d tensor.

    ``matrices_only=True`` takes the product over tensors of two or more dimensions only (linear
    weights, convolution kernels, embeddings: the paper's layers), leaving out biases and
    normalisation scales. Computed as ``expm1(sum(log1p(r_k)))`` in float64 (where the device has
    it), so that small distances keep their precision and a product beyond the result's range is
    ``inf``. Same inputs, dtype, device and zero-norm convention as :func:`relative_changes` (a
    changed zero tensor makes the distance ``inf``); no tensors give 0.
    """
    a, b = _pairs(params_a, params_b)
    if matrices_only:
        keep = [i for i, x in enumerate(a) if x.dim() >= 2]
        a, b = [a[i] for i in keep], [b[i] for i in keep]
    if not a:
        return torch.zeros(())
    ratios, dtype = _ratios(a, b)
    return torch.expm1(torch.log1p(ratios).sum()).to(dtype)


def count_layers(params: Params, *, matrices_only: bool = False) -> int:
    """L, the number of layers deep relative trust compounds over, counted as
    :func:`deep_relative_trust` counts them: every tensor, or with ``matrices_only=True`` every
    tensor of two or more dimensions (the paper's layers: weight matrices, convolution kernels,
    embeddings). The two counts differ wherever biases or normalisation scales move too: an MLP of
    N linear layers with biases has N matrices but 2N tensors that a step changes. Give either
    to :func:`max_safe_lr`, and say which; under deep relative trust a perturbation that moves
    every tensor by a relative ``eta`` is a distance of ``(1 + eta)^L - 1`` with L counted over
    the tensors that move. A module counts its ``parameters()``."""
    tensors = _tensors(params, "params")
    return sum(1 for t in tensors if t.dim() >= 2) if matrices_only else len(tensors)


def _cosines(cos_theta, depth: int) -> float:
    if isinstance(cos_theta, torch.Tensor):
        if cos_theta.dim() > 1:
            raise ValueError("cos_theta must be a number or one cosine per layer, got a tensor of shape "
                             f"{tuple(cos_theta.shape)}")
        cos_theta = cos_theta.tolist()
    if isinstance(cos_theta, (list, tuple)):
        if len(cos_theta) != depth:
            raise ValueError(f"got {len(cos_theta)} cosines for depth {depth}; give one per layer or a single number")
        values = cos_theta
    else:
        values = [cos_theta]
    for c in values:
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise ValueError(f"cos_theta must be a real number in [-1, 1] or a list of them, got {c!r}")
        if not -1.0 <= float(c) <= 1.0:  # also rejects nan
            raise ValueError(f"cos_theta must be in [-1, 1], got {c!r}")
    return min(float(c) for c in values)


def max_safe_lr(depth: int, cos_theta: Union[float, Sequence[float], torch.Tensor] = 1.0) -> float:
    """The descent lemma's bound on the relative step: ``(1 + cos_theta) ** (1 / depth) - 1``.

    For a network of ``depth`` layers, perturbing every layer by a relative amount ``lr`` (as
    Fromage does) decreases the loss, under deep relative trust, if ``lr`` is below this bound
    (Lemma 2). ``depth`` is L, counted by :func:`count_layers` either over the weight matrices
    (the paper's layers) or over every tensor that moves (biases too, as Fromage moves them); the
    second count is larger and gives the smaller bound. ``cos_theta`` is the cosine of the angle
    between each layer's perturbation and its negative gradient: 1 for a step straight down the
    gradient. Give one cosine per layer (a list, tuple or 1-D tensor of length ``depth``) and the
    bound uses the smallest, since the guarantee must hold for the worst-aligned layer. The bound
    shrinks like ``log(1 + cos_theta)/depth``; for ``cos_theta <= 0`` it is ``<= 0``: no step size
    is guaranteed to descend.
    """
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    cos_theta = _cosines(cos_theta, int(depth))
    if cos_theta == -1.0:
        return -1.0
    return math.expm1(math.log1p(cos_theta) / int(depth))


class Breakdown(NamedTuple):
    """What :func:`gradient_breakdown` measured, as tensors on the loss's device.

    ``etas``: ``[E]`` relative perturbation sizes. ``loss``: ``[E]`` loss after each
    perturbation. ``grad_change``: ``[E, K]`` relative change ``||g_k(W + dW) - g_k(W)|| /
    ||g_k(W)||`` of each measured tensor's gradient. ``loss0``: 0-d loss before any perturbation.
    ``layers``: the names of the ``K`` measured tensors (as in ``model.named_parameters()``).
    ``moved``: 0-d count of the tensors the probe moved (those with a nonzero norm and a nonzero
    gradient), the L of deep relative trust's model ``(1 + eta)^L - 1`` counted over every tensor
    that moves; :func:`count_layers` with ``matrices_only=True`` gives the paper's count.
    """

    etas: torch.Tensor
    loss: torch.Tensor
    grad_change: torch.Tensor
    loss0: torch.Tensor
    layers: List[str]
    moved: torch.Tensor


def _measured(named: List[Tuple[str, torch.Tensor]], layers) -> List[int]:
    if layers is None:
        return list(range(len(named)))
    if isinstance(layers, (str, torch.Tensor)):
        layers = [layers]
    index = []
    for layer in layers:
        if isinstance(layer, str):
            found = [i for i, (n, _) in enumerate(named) if n == layer]
        elif isinstance(layer, torch.Tensor):
            found = [i for i, (_, p) in enumerate(named) if p is layer]
        else:
            raise ValueError("layers must hold parameter names or the model's parameters, got a "
                             f"{type(layer).__name__}")
        if not found:
            what = repr(layer) if isinstance(layer, str) else f"a tensor of shape {tuple(layer.shape)}"
            raise ValueError(f"{what} is not a trainable parameter of the model; names: {[n for n, _ in named]}")
        index.append(found[0])
    return index


def _loss_and_grads(model, loss_fn, inputs, targets, params):
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("loss_fn(model(inputs), targets) must return a 0-d tensor")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def gradient_breakdown(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    etas: Iterable[float],
    layers: Optional[Sequence[Union[str, torch.Tensor]]] = None,
) -> Breakdown:
    """Figure 1's probe: how the loss and the gradients change as every layer moves along its gradient.

    Computes ``g = grad loss_fn(model(inputs), targets)`` once (pass the whole data set for the
    full-batch gradient), then for each ``eta`` sets every trainable parameter to
    ``W - eta * ||W|| / ||g_W|| * g_W`` (a relative change of exactly ``eta`` per tensor, down
    its own gradient) and measures the loss and the gradients there. A tensor with ``||W|| = 0``
    or ``||g_W|| = 0`` is not moved. ``layers`` chooses whose gradient change is reported
    (names from ``model.named_parameters()`` or the parameter tensors themselves; default: every
    trainable parameter). Under deep relative trust the change is modelled as ``(1 + eta)^L - 1``
    for ``L`` layers; that is an assumption about the network, not a bound, and measured changes
    can lie above it.

    The model runs in the mode it is in (in train mode a BatchNorm uses the statistics of
    ``inputs``). Its parameters and buffers are restored exactly afterwards, even on an error,
    and no ``.grad`` is touched. Costs one forward and backward pass per ``eta``, plus one.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    etas = [float(e) for e in etas]
    if not etas or not all(math.isfinite(e) for e in etas):
        raise ValueError(f"etas must be a non-empty list of finite numbers, got {etas!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    measured = _measured(named, layers)
    params = [p for _, p in named]
    saved = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        loss0, grads0 = _loss_and_grads(model, loss_fn, inputs, targets, params)
        steps = []  # per parameter: the change per unit eta, -||W||/||g|| * g (zero if either norm is)
        moves = []
        for w, g in zip(saved, grads0):
            wide = _wide(w.device)
            w_norm, g_norm = torch.linalg.vector_norm(w.to(wide)), torch.linalg.vector_norm(g.to(wide))
            moving = (w_norm > 0) & (g_norm > 0)
            coef = torch.where(moving, -w_norm / g_norm, torch.zeros_like(w_norm))
            steps.append((g.to(wide) * coef).to(w.dtype))
            moves.append(moving.to(device=loss0.device))
        losses, changes = [], []
        for eta in etas:
            with torch.no_grad():
                for p, w, step in zip(params, saved, steps):
                    p.copy_(w + eta * step)
            for b, b0 in buffers:
                b.copy_(b0)
            loss, grads = _loss_and_grads(model, loss_fn, inputs, targets, params)
            losses.append(loss)
            changes.append(relative_changes([grads0[i] for i in measured],
                                            [grads[i] for i in measured]).to(loss.device))
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
            for b, b0 in buffers:
                b.copy_(b0)
    return Breakdown(
        etas=torch.tensor(etas, dtype=torch.float64, device=loss0.device),
        loss=torch.stack(losses),
        grad_change=torch.stack(changes),
        loss0=loss0,
        layers=[named[i][0] for i in measured],
        moved=torch.stack(moves).sum(),
    )
