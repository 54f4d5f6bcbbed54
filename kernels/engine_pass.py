"""The engine's Triton kernels: one pass of any rule over a group of tensors, two launches at most.

``pass_kernel`` runs one program per chunk (tables: ``fromage_table.py``). A program computes its
tensor's coefficients (ten scalars) with the rule's ``COEF`` helper, then walks the chunk's
elements in blocks: it loads the pass's ``L`` lists (``x0..x3``, in fp32), hands them to the rule's ``BODY``, stores
the first ``W`` results (rounded to the list's dtype: bf16 by the shared integer recipe, to
nearest or stochastically) and accumulates the first ``S`` sum terms; the chunk's ``S`` partial
sums go to ``partials``. ``reduce_kernel`` then adds each tensor's partials in a fixed order, so
the per-tensor sums do not depend on scheduling. ``COEF`` and ``BODY`` are the rule's
``@triton.jit`` helpers (``rule_<name>.py``), passed as constexpr arguments.

Lists are at most 4, written lists at most 3, sums at most 5 (what Fromage, LARS and LAMB need);
``BODY`` returns the three written values and the five sum terms (unused ones are compiled away).
"""
import triton
import triton.language as tl

from .fromage_round import nearest_bf16, round_bf16, sr_stream
from .fromage_table import (ALIGNED_FLAG, ALIGNED_PATH, BOTH_PATHS, UNALIGNED_PATH, as_aligned_ptr, as_ptr, block_sum,
                            chunk_of, device_function, loop_bound)


@device_function
def _load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptr).to(tl.float32)


@device_function
def _store(ptr, y, mask, idx, stream, MASKED: tl.constexpr, SR: tl.constexpr):
    """Store fp32 ``y`` in the list's dtype; bf16 by the shared recipe (``idx``: flat indices)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        if SR:
            out = round_bf16(y, idx, stream)
        else:
            out = nearest_bf16(y)
    else:
        out = y.to(ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr, out, mask=mask)
    else:
        tl.store(ptr, out)


@device_function
def _block(p0, p1, p2, p3, mask, idx, k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, stream, acc0, acc1, acc2, acc3, acc4,
           BODY: tl.constexpr, L: tl.constexpr, W: tl.constexpr, S: tl.constexpr, FLAGS: tl.constexpr,
           MASKED: tl.constexpr, SR: tl.constexpr):
    """One block of elements: ``p0..p3`` are blocks of pointers, ``idx`` the elements' flat indices."""
    x0 = _load(p0, mask, MASKED)
    x1 = x0
    x2 = x0
    x3 = x0
    if L > 1:
        x1 = _load(p1, mask, MASKED)
    if L > 2:
        x2 = _load(p2, mask, MASKED)
    if L > 3:
        x3 = _load(p3, mask, MASKED)
    y0, y1, y2, a0, a1, a2, a3, a4 = BODY(k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, x0, x1, x2, x3, FLAGS)
    if W > 0:
        _store(p0, y0, mask, idx, stream, MASKED, SR)
    if W > 1:
        _store(p1, y1, mask, idx, stream, MASKED, SR)
    if W > 2:
        _store(p2, y2, mask, idx, stream, MASKED, SR)
    if MASKED:  # lanes past the end add nothing (a rule may count elements: LAMB's caution)
        a0 = tl.where(mask, a0, 0.0)
        a1 = tl.where(mask, a1, 0.0)
        a2 = tl.where(mask, a2, 0.0)
        a3 = tl.where(mask, a3, 0.0)
        a4 = tl.where(mask, a4, 0.0)
    if S > 0:
        acc0 += a0
    if S > 1:
        acc1 += a1
    if S > 2:
        acc2 += a2
    if S > 3:
        acc3 += a3
    if S > 4:
        acc4 += a4
    return acc0, acc1, acc2, acc3, acc4


@device_function
def _sweep(q0, q1, q2, q3, start, n_full, k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, stream, acc0, acc1, acc2, acc3, acc4,
           BODY: tl.constexpr, L: tl.constexpr, W: tl.constexpr, S: tl.constexpr, FLAGS: tl.constexpr,
           BLOCK: tl.constexpr, SR: tl.constexpr):
    """Unmasked full blocks; ``q0..q3`` point at the chunk's first element, ``start``."""
    lanes = tl.arange(0, BLOCK)
    for off in range(0, loop_bound(n_full) * BLOCK, BLOCK):
        acc0, acc1, acc2, acc3, acc4 = _block(q0 + off + lanes, q1 + off + lanes, q2 + off + lanes,
                                              q3 + off + lanes, None, start + off + lanes, k0, k1, k2, k3, k4, k5,
                                              k6, k7, k8, k9, stream, acc0, acc1, acc2, acc3, acc4, BODY, L, W, S,
                                              FLAGS, False, SR)
    return acc0, acc1, acc2, acc3, acc4


@device_function
def _pointer(addrs_ptr, k, t, n, head, D: tl.constexpr, Z: tl.constexpr, ALIGNED: tl.constexpr):
    a = tl.load(addrs_ptr + k * n + t)
    if ALIGNED:
        # list k + head elements (of Z bytes) is 16-byte aligned (the host checked: the flags)
        return as_aligned_ptr(a + head * Z, D)
    return as_ptr(a, D)


@device_function
def _pointers(addrs_ptr, t, n, head, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
              Z0: tl.constexpr, Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr, L: tl.constexpr,
              ALIGNED: tl.constexpr):
    """The lists' pointers of tensor ``t`` (list ``k``'s address at ``addrs[k * n + t]``); with
    ``ALIGNED``, moved on by ``head`` elements and promised 16-byte aligned (only inside the branch
    that checked the flag)."""
    q0 = _pointer(addrs_ptr, 0, t, n, head, D0, Z0, ALIGNED)
    q1 = q0
    q2 = q0
    q3 = q0
    if L > 1:
        q1 = _pointer(addrs_ptr, 1, t, n, head, D1, Z1, ALIGNED)
    if L > 2:
        q2 = _pointer(addrs_ptr, 2, t, n, head, D2, Z2, ALIGNED)
    if L > 3:
        q3 = _pointer(addrs_ptr, 3, t, n, head, D3, Z3, ALIGNED)
    return q0, q1, q2, q3


@device_function
def _masked(q0, q1, q2, q3, offs, end, k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, stream, BODY: tl.constexpr,
            L: tl.constexpr, W: tl.constexpr, S: tl.constexpr, FLAGS: tl.constexpr, BLOCK: tl.constexpr,
            SR: tl.constexpr):
    """One masked block (elements ``offs < end``); its sum terms summed over the block."""
    zero = tl.full([BLOCK], 0.0, tl.float32)
    a0, a1, a2, a3, a4 = _block(q0 + offs, q1 + offs, q2 + offs, q3 + offs, offs < end, offs, k0, k1, k2, k3, k4,
                                k5, k6, k7, k8, k9, stream, zero, zero, zero, zero, zero, BODY, L, W, S, FLAGS, True,
                                SR)
    return block_sum(a0), block_sum(a1), block_sum(a2), block_sum(a3), block_sum(a4)


@triton.jit
def pass_kernel(layout_ptr, addrs_ptr, partials_ptr, sums_ptr, hyper_ptr, s0_ptr, s1_ptr, globals_ptr, found_inf_ptr,
                grad_scale_ptr, seed_ptr, n, COEF: tl.constexpr, BODY: tl.constexpr, L: tl.constexpr,
                W: tl.constexpr, S: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                D3: tl.constexpr, Z0: tl.constexpr, Z1: tl.constexpr, Z2: tl.constexpr, Z3: tl.constexpr,
                FLAGS: tl.constexpr, BLOCK: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, SR: tl.constexpr, PATHS: tl.constexpr = BOTH_PATHS,
                LR_SLOT: tl.constexpr = -1):
    """``D0..D3``: the lists' element types, ``Z0..Z3`` their sizes in bytes; ``HAS_FOUND_INF`` only for a pass
    that writes (a non-zero found_inf skips it); ``LR_SLOT``: where the rule's lr is among the packed
    hyper-parameters, for a pass that writes (an lr that is negative or not finite in float32, a
    tensor edited after construction, skips it as found_inf does; -1: no check). ``PATHS``
    (``fromage_table.py``) compiles only the element paths the group's tensors take: a kernel with
    both stores through shared memory on the unaligned path, so groups that need one path get a
    kernel without the other."""
    c = tl.program_id(0).to(tl.int64)
    go = True
    if LR_SLOT >= 0:
        lr = tl.load(hyper_ptr + LR_SLOT)
        go = (lr >= 0) & (lr <= 3.4028234663852886e38)
    if HAS_FOUND_INF:
        go = go & (tl.load(found_inf_ptr) == 0)
    if go:
        t, start, lo, hi, first, flags, head = chunk_of(layout_ptr, addrs_ptr, c, n, BLOCK, L)
        k0, k1, k2, k3, k4, k5, k6, k7, k8, k9 = COEF(t, c == first, hyper_ptr, sums_ptr, s0_ptr, s1_ptr, globals_ptr,
                                                      grad_scale_ptr, FLAGS, HAS_GRAD_SCALE)
        stream = tl.full((), 0, tl.uint32)
        if SR:
            stream = sr_stream(tl.load(seed_ptr), t)
        acc0 = tl.full([BLOCK], 0.0, tl.float32)
        acc1 = tl.full([BLOCK], 0.0, tl.float32)
        acc2 = tl.full([BLOCK], 0.0, tl.float32)
        acc3 = tl.full([BLOCK], 0.0, tl.float32)
        acc4 = tl.full([BLOCK], 0.0, tl.float32)
        n_full = tl.maximum(hi - lo, 0) // BLOCK
        if PATHS == ALIGNED_PATH:
            # Every list + head is 16-byte aligned and full blocks start at multiples of BLOCK
            # elements from there: unmasked 16-byte vector accesses.
            q0, q1, q2, q3 = _pointers(addrs_ptr, t, n, head, D0, D1, D2, D3, Z0, Z1, Z2, Z3, L, True)
            acc0, acc1, acc2, acc3, acc4 = _sweep(q0 + start, q1 + start, q2 + start, q3 + start, lo, n_full, k0,
                                                  k1, k2, k3, k4, k5, k6, k7, k8, k9, stream, acc0, acc1, acc2, acc3,
                                                  acc4, BODY, L, W, S, FLAGS, BLOCK, SR)
        elif PATHS == UNALIGNED_PATH:
            q0, q1, q2, q3 = _pointers(addrs_ptr, t, n, head, D0, D1, D2, D3, Z0, Z1, Z2, Z3, L, False)
            acc0, acc1, acc2, acc3, acc4 = _sweep(q0 + lo, q1 + lo, q2 + lo, q3 + lo, lo, n_full, k0, k1, k2, k3,
                                                  k4, k5, k6, k7, k8, k9, stream, acc0, acc1, acc2, acc3, acc4, BODY,
                                                  L, W, S, FLAGS, BLOCK, SR)
        elif (flags & ALIGNED_FLAG) != 0:
            q0, q1, q2, q3 = _pointers(addrs_ptr, t, n, head, D0, D1, D2, D3, Z0, Z1, Z2, Z3, L, True)
            acc0, acc1, acc2, acc3, acc4 = _sweep(q0 + start, q1 + start, q2 + start, q3 + start, lo, n_full, k0,
                                                  k1, k2, k3, k4, k5, k6, k7, k8, k9, stream, acc0, acc1, acc2, acc3,
                                                  acc4, BODY, L, W, S, FLAGS, BLOCK, SR)
        else:
            q0, q1, q2, q3 = _pointers(addrs_ptr, t, n, head, D0, D1, D2, D3, Z0, Z1, Z2, Z3, L, False)
            acc0, acc1, acc2, acc3, acc4 = _sweep(q0 + lo, q1 + lo, q2 + lo, q3 + lo, lo, n_full, k0, k1, k2, k3,
                                                  k4, k5, k6, k7, k8, k9, stream, acc0, acc1, acc2, acc3, acc4, BODY,
                                                  L, W, S, FLAGS, BLOCK, SR)
        # The full blocks' sums, then the masked parts' (summed apart, so that the block-wide
        # accumulators are not live across them: registers).
        sum0 = block_sum(acc0)
        sum1 = block_sum(acc1)
        sum2 = block_sum(acc2)
        sum3 = block_sum(acc3)
        sum4 = block_sum(acc4)
        q0, q1, q2, q3 = _pointers(addrs_ptr, t, n, head, D0, D1, D2, D3, Z0, Z1, Z2, Z3, L, False)
        done = lo + n_full * BLOCK
        if done < hi:  # a masked block for the chunk's last elements, where it has some
            m0, m1, m2, m3, m4 = _masked(q0, q1, q2, q3, done + tl.arange(0, BLOCK), hi, k0, k1, k2, k3, k4, k5,
                                         k6, k7, k8, k9, stream, BODY, L, W, S, FLAGS, BLOCK, SR)
            sum0 += m0
            sum1 += m1
            sum2 += m2
            sum3 += m3
            sum4 += m4
        if (c == first) & (head > 0):  # the elements before the aligned part (never past the tensor's end: host)
            m0, m1, m2, m3, m4 = _masked(q0, q1, q2, q3, tl.arange(0, BLOCK).to(tl.int64), head, k0, k1, k2, k3,
                                         k4, k5, k6, k7, k8, k9, stream, BODY, L, W, S, FLAGS, BLOCK, SR)
            sum0 += m0
            sum1 += m1
            sum2 += m2
            sum3 += m3
            sum4 += m4
        if S > 0:
            tl.store(partials_ptr + S * c, sum0)
        if S > 1:
            tl.store(partials_ptr + S * c + 1, sum1)
        if S > 2:
            tl.store(partials_ptr + S * c + 2, sum2)
        if S > 3:
            tl.store(partials_ptr + S * c + 3, sum3)
        if S > 4:
            tl.store(partials_ptr + S * c + 4, sum4)


@triton.jit
def reduce_kernel(layout_ptr, partials_ptr, sums_ptr, n, S: tl.constexpr, RBLOCK: tl.constexpr):
    """Per tensor: its chunks' ``S`` partial sums added in a fixed order."""
    t = tl.program_id(0).to(tl.int64)
    first = tl.load(layout_ptr + n + t)
    count = tl.load(layout_ptr + 2 * n + t)
    acc0 = tl.full([RBLOCK], 0.0, tl.float32)
    acc1 = tl.full([RBLOCK], 0.0, tl.float32)
    acc2 = tl.full([RBLOCK], 0.0, tl.float32)
    acc3 = tl.full([RBLOCK], 0.0, tl.float32)
    acc4 = tl.full([RBLOCK], 0.0, tl.float32)
    lanes = tl.arange(0, RBLOCK)
    for k in range(0, loop_bound(count), RBLOCK):
        mask = k + lanes < count
        row = S * (first + k + lanes)
        acc0 += tl.load(partials_ptr + row, mask=mask, other=0.0)
        if S > 1:
            acc1 += tl.load(partials_ptr + row + 1, mask=mask, other=0.0)
        if S > 2:
            acc2 += tl.load(partials_ptr + row + 2, mask=mask, other=0.0)
        if S > 3:
            acc3 += tl.load(partials_ptr + row + 3, mask=mask, other=0.0)
        if S > 4:
            acc4 += tl.load(partials_ptr + row + 4, mask=mask, other=0.0)
    tl.store(sums_ptr + S * t, block_sum(acc0))
    if S > 1:
        tl.store(sums_ptr + S * t + 1, block_sum(acc1))
    if S > 2:
        tl.store(sums_ptr + S * t + 2, block_sum(acc2))
    if S > 3:
        tl.store(sums_ptr + S * t + 3, block_sum(acc3))
    if S > 4:
        tl.store(sums_ptr + S * t + 4, block_sum(acc4))
