"""Phase 1: per-tensor ``[||p||^2, ||g||^2, <p, g>]`` in fp32, two launches, no atomics.

``partials_kernel`` runs one program per chunk and writes that chunk's three sums;
``reduce_kernel`` runs one program per tensor and adds its chunks' partials in a fixed order, so
the result does not depend on scheduling.
"""
import triton
import triton.language as tl

from .fromage_table import (ALIGNED_FLAG, ALIGNED_PATH, BOTH_PATHS, UNALIGNED_PATH, as_aligned_ptr, as_ptr, block_sum,
                            chunk_of, device_function, loop_bound, tensor_addrs)


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


@device_function
def _masked_sums(p, g, offs, end, INNER: tl.constexpr):
    """``[sum p*p, sum g*g, sum p*g]`` (the last 0 without INNER) of the elements ``offs < end`` of one block."""
    mask = offs < end
    x = tl.load(p + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
    pg = block_sum(x * y) if INNER else tl.full((), 0.0, tl.float32)
    return block_sum(x * x), block_sum(y * y), pg


@triton.jit
def partials_kernel(layout_ptr, addrs_ptr, partials_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                    INNER: tl.constexpr, PATHS: tl.constexpr = BOTH_PATHS):
    c = tl.program_id(0).to(tl.int64)
    t, start, lo, hi, first, flags, head = chunk_of(layout_ptr, addrs_ptr, c, n, BLOCK)
    p_addr, g_addr = tensor_addrs(addrs_ptr, t, n)
    n_full = tl.maximum(hi - lo, 0) // BLOCK
    acc_pp = tl.full([BLOCK], 0.0, tl.float32)
    acc_gg = tl.full([BLOCK], 0.0, tl.float32)
    acc_pg = tl.full([BLOCK], 0.0, tl.float32)
    if PATHS == ALIGNED_PATH:
        # p + head and g + head are 16-byte aligned and full blocks start at multiples of BLOCK
        # elements from there: unmasked 16-byte vector loads.
        p = as_aligned_ptr(p_addr, head, DTYPE)
        g = as_aligned_ptr(g_addr, head, DTYPE)
        acc_pp, acc_gg, acc_pg = _accumulate(p + start, g + start, n_full, acc_pp, acc_gg, acc_pg, BLOCK, INNER)
    elif PATHS == UNALIGNED_PATH:
        p = as_ptr(p_addr, DTYPE)
        g = as_ptr(g_addr, DTYPE)
        acc_pp, acc_gg, acc_pg = _accumulate(p + lo, g + lo, n_full, acc_pp, acc_gg, acc_pg, BLOCK, INNER)
    elif (flags & ALIGNED_FLAG) != 0:
        p = as_aligned_ptr(p_addr, head, DTYPE)
        g = as_aligned_ptr(g_addr, head, DTYPE)
        acc_pp, acc_gg, acc_pg = _accumulate(p + start, g + start, n_full, acc_pp, acc_gg, acc_pg, BLOCK, INNER)
    else:
        p = as_ptr(p_addr, DTYPE)
        g = as_ptr(g_addr, DTYPE)
        acc_pp, acc_gg, acc_pg = _accumulate(p + lo, g + lo, n_full, acc_pp, acc_gg, acc_pg, BLOCK, INNER)
    # The full blocks' sums, then the masked parts' (accumulated apart, so that the block-wide
    # accumulators are not live across them: registers).
    pp = block_sum(acc_pp)
    gg = block_sum(acc_gg)
    pg = block_sum(acc_pg)
    p = as_ptr(p_addr, DTYPE)
    g = as_ptr(g_addr, DTYPE)
    done = lo + n_full * BLOCK
    if done < hi:  # a masked block for the chunk's last elements, where it has some
        tail_pp, tail_gg, tail_pg = _masked_sums(p, g, done + tl.arange(0, BLOCK), hi, INNER)
        pp += tail_pp
        gg += tail_gg
        pg += tail_pg
    if (c == first) & (head > 0):  # the elements before the aligned part
        head_pp, head_gg, head_pg = _masked_sums(p, g, tl.arange(0, BLOCK).to(tl.int64), head, INNER)
        pp += head_pp
        gg += head_gg
        pg += head_pg
    tl.store(partials_ptr + 3 * c, pp)
    tl.store(partials_ptr + 3 * c + 1, gg)
    tl.store(partials_ptr + 3 * c + 2, pg)


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
