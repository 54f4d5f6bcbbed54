"""Phase 1: per-tensor ``[||p||^2, ||g||^2, <p, g>]`` in fp32, two launches, no atomics.

``partials_kernel`` runs one program per chunk and writes that chunk's three sums;
``reduce_kernel`` runs one program per tensor and adds its chunks' partials in a fixed order, so
the result does not depend on scheduling.
"""
import triton
import triton.language as tl

from .fromage_table import ALIGNED_FLAG, as_aligned_ptr, as_ptr, block_sum, chunk_of, device_function, loop_bound, tensor_addrs


@device_function
def _accumulate(p, g, n_full, acc_pp, acc_gg, acc_pg, BLOCK: tl.constexpr, INNER: tl.constexpr):
    """Unmasked full blocks from ``p`` and ``g``, which point at the chunk's first element."""
    lanes = tl.arange(0, BLOCK)
    for off in range(0, loop_bound(n_full) * BLOCK, BLOCK):
        x = tl.load(p + off + lanes).to(tl.float32)
        y = tl.load(g + off + lanes).to(tl.float32)
        acc_pp += x * x
        acc_gg += y * y
        if INNER:
            acc_pg += x * y
    return acc_pp, acc_gg, acc_pg


@triton.jit
def partials_kernel(layout_ptr, addrs_ptr, partials_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                    INNER: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    t, start, end, first, flags = chunk_of(layout_ptr, addrs_ptr, c, n, BLOCK)
    p_addr, g_addr = tensor_addrs(addrs_ptr, t, n)
    n_full = tl.maximum(end - start, 0) // BLOCK
    acc_pp = tl.full([BLOCK], 0.0, tl.float32)
    acc_gg = tl.full([BLOCK], 0.0, tl.float32)
    acc_pg = tl.full([BLOCK], 0.0, tl.float32)
    if (flags & ALIGNED_FLAG) != 0:
        # Both bases are 16-byte aligned and chunks start at multiples of BLOCK elements: unmasked
        # 16-byte vector loads.
        p = as_aligned_ptr(p_addr, DTYPE)
        g = as_aligned_ptr(g_addr, DTYPE)
        acc_pp, acc_gg, acc_pg = _accumulate(p + start, g + start, n_full, acc_pp, acc_gg, acc_pg, BLOCK, INNER)
    else:
        p = as_ptr(p_addr, DTYPE)
        g = as_ptr(g_addr, DTYPE)
        acc_pp, acc_gg, acc_pg = _accumulate(p + start, g + start, n_full, acc_pp, acc_gg, acc_pg, BLOCK, INNER)
    p = as_ptr(p_addr, DTYPE)
    g = as_ptr(g_addr, DTYPE)
    offs = start + n_full * BLOCK + tl.arange(0, BLOCK)
    mask = offs < end
    x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    acc_pp += x * x
    acc_gg += y * y
    if INNER:
        acc_pg += x * y
    tl.store(partials_ptr + 3 * c, block_sum(acc_pp))
    tl.store(partials_ptr + 3 * c + 1, block_sum(acc_gg))
    tl.store(partials_ptr + 3 * c + 2, block_sum(acc_pg))


@triton.jit
def reduce_kernel(layout_ptr, partials_ptr, stats_ptr, n, RBLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(layout_ptr + n + t)
    count = tl.load(layout_ptr + 2 * n + t)
    acc_pp = tl.full([RBLOCK], 0.0, tl.float32)
    acc_gg = tl.full([RBLOCK], 0.0, tl.float32)
    acc_pg = tl.full([RBLOCK], 0.0, tl.float32)
    lanes = tl.arange(0, RBLOCK)
    for k in range(0, loop_bound(count), RBLOCK):
        mask = k + lanes < count
        row = 3 * (first + k + lanes)
        acc_pp += tl.load(partials_ptr + row, mask=mask, other=0.0)
        acc_gg += tl.load(partials_ptr + row + 1, mask=mask, other=0.0)
        acc_pg += tl.load(partials_ptr + row + 2, mask=mask, other=0.0)
    tl.store(stats_ptr + 3 * t, block_sum(acc_pp))
    tl.store(stats_ptr + 3 * t + 1, block_sum(acc_gg))
    tl.store(stats_ptr + 3 * t + 2, block_sum(acc_pg))
