"""An independent numpy model of what docs/backends.md promises bit for bit, and the values that test it.

The model is written from the definitions of docs/backends.md, not from the package's code: uint32 arithmetic
for the bf16 roundings, and numpy float32 (every operation correctly rounded, nothing fused) for
the coefficients and the update. Values are drawn to reach every case a rounding can get wrong:
each sign and exponent (subnormals, the largest finite values, infinities, NaNs of any sign and
payload) with the low halves at and around the ties, plus uniformly random bit patterns.
"""
import numpy as np
import torch

MASK32 = 0xFFFFFFFF
BF16_NAN = 0x7FC0


def mix32(x):
    x = np.asarray(x, dtype=np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    x = x ^ (x >> np.uint32(16))
    return x


def is_nan_bits(bits):
    return (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)


def sr_bits(bits, seed: int, tensor_index: int):
    """bf16 bits of fp32 ``bits`` (uint32, flat) rounded stochastically: the documented recipe."""
    stream = mix32(np.array([(seed + tensor_index * 0x9E3779B9) & MASK32], dtype=np.uint64).astype(np.uint32))
    idx = (np.arange(bits.size, dtype=np.uint64) & MASK32).astype(np.uint32)
    r = mix32(idx ^ stream) & np.uint32(0xFFFF)
    out = ((bits + r) >> np.uint32(16)).astype(np.uint16)
    out[is_nan_bits(bits)] = BF16_NAN
    return out


def rne_bits(bits):
    """bf16 bits of fp32 ``bits`` rounded to nearest, ties to even; every NaN is 0x7FC0."""
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    out = ((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16)).astype(np.uint16)
    out[is_nan_bits(bits)] = BF16_NAN
    return out


def hard_fp32_bits(rng, n_random=200_000):
    """uint32 patterns: every (sign, exponent) x high mantissa bits that decide ties and carries
    x low halves at and around the tie, then uniformly random patterns (0.4% of them NaNs)."""
    sign_exp = np.arange(512, dtype=np.uint32) << np.uint32(23)
    mant_hi = np.array([0x00, 0x01, 0x3F, 0x40, 0x7E, 0x7F], dtype=np.uint32) << np.uint32(16)
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF], dtype=np.uint32)
    grid = (sign_exp[:, None, None] | mant_hi[None, :, None] | low[None, None, :]).reshape(-1)
    rand = rng.integers(0, 2**32, n_random, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([grid, rand])


def as_float_tensor(bits, device="cpu"):
    return torch.from_numpy(bits.astype(np.uint32).view(np.int32).copy()).view(torch.float32).to(device)


def tensor_bits(t: torch.Tensor):
    """The bit patterns of a tensor as unsigned numpy integers (uint16 for 2-byte dtypes)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.element_size() == 2:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.element_size() == 4:
        return t.view(torch.int32).numpy().view(np.uint32)
    raise TypeError(t.dtype)


def hard_sqrt_args(rng, n):
    """fp32 values whose square roots lie as close as fp32 allows to a midpoint between two floats,
    where a square root that is not correctly rounded goes wrong: the squares of midpoints."""
    roots = np.exp(rng.uniform(np.log(1e-18), np.log(1e18), n)).astype(np.float32)
    mid = roots.astype(np.float64) + np.spacing(roots).astype(np.float64) / 2
    return (mid * mid).astype(np.float32)


def coefficients(stats, lr, *, max_norm=None, p_bound=None, maximize=False, prefactor=True, grad_scale=None):
    """``(cp, cg, max_norm)`` of the documented update rule, one fp32 rounding per operation."""
    f = np.float32
    s_pp, s_gg, s_pg = (np.ascontiguousarray(stats[:, k], dtype=f) for k in range(3))
    lr = f(lr)
    with np.errstate(all="ignore"):
        both = (s_pp > 0) & (s_gg > 0)
        root_p = np.sqrt(s_pp)
        a = np.where(both, lr * root_p / np.sqrt(np.where(both, s_gg, f(1))),
                     lr if grad_scale is None else lr / f(grad_scale)).astype(f)
        if maximize:
            a = -a
        s = np.full_like(a, f(1) / np.sqrt(f(1) + lr * lr) if prefactor else f(1))
        mn = None
        if p_bound is not None:
            mn = np.asarray(max_norm, dtype=f)
            mn = np.where(mn < 0, f(p_bound) * root_p, mn).astype(f)
            norm_sq = s * s * (s_pp - f(2) * a * s_pg + a * a * s_gg)
            norm = np.sqrt(np.where(norm_sq > 0, norm_sq, f(0)))
            clamp = norm > mn
            s = np.where(clamp, s * mn / np.where(clamp, norm, f(1)), s).astype(f)
        return s, -a * s, mn


def update(p, g, cp, cg):
    """fp32 ``round(round(cp * p) + round(cg * g))`` of one tensor (numpy float32 arrays)."""
    with np.errstate(all="ignore"):
        return np.float32(cp) * p + np.float32(cg) * g
