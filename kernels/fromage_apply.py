"""Phase 2: ``p <- s*(p - a*g)`` for every tensor of a group in one launch, one program per chunk.

Each program derives its tensor's coefficients from the stats row, lr, max_norm and the flags with
the operations of ``fromage_fused._math.coefficients``, one rounding each, in the same order, so no
per-tensor scalar is computed on the host and the result is the other backends' bit for bit. Every
program reads its tensor's max_norm; when it is unset, the first chunk's program writes it. Every
program computes the same value, so the others read the old (unset) or the new value and agree;
the accesses are a relaxed load (``ld.volatile``, which the PTX memory model treats as
``ld.relaxed.sys``) and a relaxed atomic exchange, so that they are not a data race.
"""
import triton
import triton.language as tl

from .fromage_round import nearest_bf16, round_bf16, sr_stream
from .fromage_table import (ALIGNED_FLAG, ALIGNED_PATH, BOTH_PATHS, UNALIGNED_PATH, as_aligned_ptr, as_ptr, chunk_of,
                            device_function, div_rn, loop_bound, sqrt_rn, tensor_addrs)

#: Options every launch of :func:`apply_kernel` must pass. Without multiply-add fusion each product
#: and sum below is rounded on its own (mul.rn / add.rn in the PTX), as in every other backend; the
#: interpreter (numpy) never fuses.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@device_function
def _update(pp, gp, mask, idx, cp, cg, stream, MASKED: tl.constexpr, SR: tl.constexpr):
    """One block: ``pp``, ``gp`` are blocks of pointers, ``idx`` the elements' flat indices."""
    if MASKED:
        x = tl.load(pp, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(gp, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(pp).to(tl.float32)
        y = tl.load(gp).to(tl.float32)
    # round(round(cp * p) + round(cg * g)): unfused under LAUNCH_OPTIONS.
    new = x * cp + y * cg
    if SR:
        out = round_bf16(new, idx, stream)
    elif pp.dtype.element_ty == tl.bfloat16:
        out = nearest_bf16(new)
    else:
        out = new.to(pp.dtype.element_ty)
    if MASKED:
        tl.store(pp, out, mask=mask)
    else:
        tl.store(pp, out)


@device_function
def _sweep(p, g, start, n_full, cp, cg, stream, BLOCK: tl.constexpr, SR: tl.constexpr):
    """Unmasked full blocks; ``p`` and ``g`` point at the chunk's first element, ``start``."""
    lanes = tl.arange(0, BLOCK)
    for off in range(0, loop_bound(n_full) * BLOCK, BLOCK):
        _update(p + off + lanes, g + off + lanes, None, start + off + lanes, cp, cg, stream, False, SR)


@triton.jit
def apply_kernel(layout_ptr, addrs_ptr, max_norm_ptr, stats_ptr, lr_ptr, found_inf_ptr, grad_scale_ptr,
                 seed_ptr, p_bound, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_BOUND: tl.constexpr, MAXIMIZE: tl.constexpr, PREFACTOR: tl.constexpr,
                 HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, SR: tl.constexpr,
                 PATHS: tl.constexpr = BOTH_PATHS):
    """``PATHS`` (see ``fromage_table.path_of``) compiles only the paths the group's tensors take: a
    kernel with both stores through shared memory on the unaligned path (its loads take the
    aligned path's layout), so groups that need one path get a kernel without the other."""
    c = tl.program_id(0).to(tl.int64)
    lr = tl.load(lr_ptr)
    # An lr that is negative or not finite in float32 (a tensor edited after construction) skips
    # the step, as found_inf does (fromage_fused/_math.py: usable_lr).
    go = (lr >= 0) & (lr <= 3.4028234663852886e38)
    if HAS_FOUND_INF:
        go = go & (tl.load(found_inf_ptr) == 0)
    if go:
        t, start, lo, hi, first, flags, head = chunk_of(layout_ptr, addrs_ptr, c, n, BLOCK)
        p_addr, g_addr = tensor_addrs(addrs_ptr, t, n)
        s_pp = tl.load(stats_ptr + 3 * t)
        s_gg = tl.load(stats_ptr + 3 * t + 1)
        s_pg = tl.load(stats_ptr + 3 * t + 2)
        both = (s_pp > 0) & (s_gg > 0)
        root_p = sqrt_rn(s_pp)
        scaled = div_rn(lr * root_p, sqrt_rn(tl.where(both, s_gg, tl.full((), 1.0, tl.float32))))
        fallback = lr
        if HAS_GRAD_SCALE:
            fallback = div_rn(lr, tl.load(grad_scale_ptr))
        a = tl.where(both, scaled, fallback)
        if MAXIMIZE:
            a = -a
        s = tl.full((), 1.0, tl.float32)
        if PREFACTOR:
            s = div_rn(tl.full((), 1.0, tl.float32), sqrt_rn(1.0 + lr * lr))
        if HAS_BOUND:
            mn_ptr = max_norm_ptr + t
            old = tl.load(mn_ptr, volatile=True)
            mn = tl.where(old < 0, p_bound * root_p, old)
            norm_sq = s * s * (s_pp - 2.0 * a * s_pg + a * a * s_gg)
            norm = sqrt_rn(tl.where(norm_sq > 0, norm_sq, tl.full((), 0.0, tl.float32)))
            clamp = norm > mn
            s = tl.where(clamp, div_rn(s * mn, tl.where(clamp, norm, tl.full((), 1.0, tl.float32))), s)
            if (c == first) & (old < 0):
                # On the bits (an int32 exchange): the interpreter exchanges no floats.
                tl.atomic_xchg(mn_ptr.to(tl.pointer_type(tl.int32)), mn.to(tl.int32, bitcast=True), sem="relaxed")
        cp = s
        cg = -a * s
        stream = tl.full((), 0, tl.uint32)
        if SR:
            stream = sr_stream(tl.load(seed_ptr), t)
        n_full = tl.maximum(hi - lo, 0) // BLOCK
        if PATHS == ALIGNED_PATH:
            # p + head is 16-byte aligned, and so is every full block from element lo = start + head.
            p = as_aligned_ptr(p_addr, head, DTYPE)
            g = as_aligned_ptr(g_addr, head, DTYPE)
            _sweep(p + start, g + start, lo, n_full, cp, cg, stream, BLOCK, SR)
        elif PATHS == UNALIGNED_PATH:
            p = as_ptr(p_addr, DTYPE)
            g = as_ptr(g_addr, DTYPE)
            _sweep(p + lo, g + lo, lo, n_full, cp, cg, stream, BLOCK, SR)
        elif (flags & ALIGNED_FLAG) != 0:
            p = as_aligned_ptr(p_addr, head, DTYPE)
            g = as_aligned_ptr(g_addr, head, DTYPE)
            _sweep(p + start, g + start, lo, n_full, cp, cg, stream, BLOCK, SR)
        else:
            p = as_ptr(p_addr, DTYPE)
            g = as_ptr(g_addr, DTYPE)
            _sweep(p + lo, g + lo, lo, n_full, cp, cg, stream, BLOCK, SR)
        p = as_ptr(p_addr, DTYPE)
        g = as_ptr(g_addr, DTYPE)
        done = lo + n_full * BLOCK
        if done < hi:  # a masked block for the chunk's last elements, where it has some
            offs = done + tl.arange(0, BLOCK)
            _update(p + offs, g + offs, offs < hi, offs, cp, cg, stream, True, SR)
        if (c == first) & (head > 0):  # the elements before the aligned part
            offs = tl.arange(0, BLOCK).to(tl.int64)
            _update(p + offs, g + offs, offs < head, offs, cp, cg, stream, True, SR)
