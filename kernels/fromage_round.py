"""Rounding of fp32 results to bf16: to nearest even, or stochastically, in integer arithmetic.

Both are the integer recipes of ``fromage_fused.engine.rounding`` (``nearest_bf16``,
``stochastic_round_bf16``), bit for bit: everything is uint32 arithmetic, whose wrap-around equals
the torch recipe's ``& 0xFFFFFFFF``, and every NaN becomes the quiet NaN 0x7FC0. Rounding to nearest
is done on the bits too, because Triton's interpreter truncates on ``.to(tl.bfloat16)`` (and
mishandles subnormals); the result is the high half of the bits, the same on every platform.
"""
import triton
import triton.language as tl

from .fromage_table import device_function


@device_function
def mix32(x):
    """lowbias32 on uint32."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@device_function
def sr_stream(seed, t):
    """``mix32(seed + t * 0x9E3779B9)`` from the int64 seed and the tensor's index in its group."""
    s = seed.to(tl.uint32) + t.to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32)
    return mix32(s)


@device_function
def _to_bf16(y, bits):
    """bf16 from fp32 bits whose low half is already rounded away; every NaN (whatever its sign
    and payload) becomes the quiet NaN 0x7FC0."""
    bits = tl.where(y == y, bits, 0x7FC00000)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@device_function
def nearest_bf16(y):
    """fp32 ``y`` to bf16, to nearest, ties to even (infinities stay, the carry reaches them)."""
    bits = y.to(tl.uint32, bitcast=True)
    return _to_bf16(y, bits + 0x7FFF + ((bits >> 16) & 1))


@device_function
def round_bf16(y, offs, stream):
    """fp32 ``y`` at flat element indices ``offs`` (int64) to bf16 stochastically.

    Infinities have zero low bits, so adding ``r < 2**16`` leaves them as they are: the same as
    the torch recipe's round-to-nearest of non-finite values.
    """
    bits = y.to(tl.uint32, bitcast=True)
    r = mix32(offs.to(tl.uint32) ^ stream) & 0xFFFF
    return _to_bf16(y, bits + r)


@triton.jit
def stochastic_round_bf16_kernel(x_ptr, out_ptr, seed_ptr, t, numel, BLOCK: tl.constexpr):
    """Standalone form of :func:`round_bf16`, for checking it against the torch recipe."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    y = tl.load(x_ptr + offs, mask=mask, other=0.0)
    stream = sr_stream(tl.load(seed_ptr), t)
    tl.store(out_ptr + offs, round_bf16(y, offs, stream), mask=mask)


@triton.jit
def nearest_bf16_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """Standalone form of :func:`nearest_bf16`, for checking it against the torch recipe."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(out_ptr + offs, nearest_bf16(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)
