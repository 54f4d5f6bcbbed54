"""Device-side reading of the tensor tables built by ``fromage_fused.backends.triton``.

Two int64 tables describe a group of ``n`` tensors cut into ``C`` chunks (``chunk`` elements each,
chosen per tensor: a multiple of the kernels' ``BLOCK``):

* ``layout`` (depends only on the sizes): ``[numel (n) | first_chunk (n) | n_chunks (n) |
  chunk (n) | chunk_tensor (C)]``. Every tensor owns at least one chunk, so an empty tensor still
  gets a program (its max_norm must be set like any other).
* ``addrs`` (depends on the storages): ``[p address (n) | g address (n) | flags (n)]``. Flag bit 0
  says that ``p + head`` and ``g + head`` are both 16-byte aligned, with ``head = flags >> 1``
  elements (0 for aligned tensors; fewer than a 16-byte vector's elements for views whose parameter
  and gradient are misaligned by the same amount), which the host checked before promising it here.
"""
import os

import triton
import triton.language as tl

ALIGNED_FLAG = tl.constexpr(1)
HEAD_SHIFT = tl.constexpr(1)  # flags >> HEAD_SHIFT: elements before the aligned part

# Which element paths a launch compiles (its PATHS, chosen by the host from the flags): the 16-byte
# aligned one, the other, or both (then each tensor's flag picks).
ALIGNED_PATH = tl.constexpr(1)
UNALIGNED_PATH = tl.constexpr(2)
BOTH_PATHS = tl.constexpr(3)


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED = _interpreting()


def device_function(fn):
    """``triton.jit`` for a helper called from a kernel. Under the interpreter the helper stays a
    plain function: an interpreted jit call re-patches the language at every call, which costs
    milliseconds per call inside loops (the kernels avoid the constructs that need the rewrite)."""
    if INTERPRETED:
        return fn
    return triton.jit(fn)


if INTERPRETED:
    def block_sum(x):
        # The interpreter sums with numpy only when it recognises the standard combine function;
        # ``tl.sum`` would go through an interpreted jit call first.
        return tl.reduce(x, 0, tl.standard._sum_combine)
else:
    @triton.jit
    def block_sum(x):
        return tl.sum(x, axis=0)


if INTERPRETED:
    def sqrt_rn(x):
        return tl.sqrt_rn(x)

    def div_rn(x, y):
        return tl.div_rn(x, y)
else:
    # Correctly rounded and subnormal-preserving fp32 square root and division, written as the PTX
    # instructions themselves: tl.sqrt_rn / tl.div_rn go through libdevice, which some Triton
    # versions (3.2) link with flush-to-zero (sqrt.rn.ftz / div.rn.ftz), so a subnormal operand or
    # result would differ from every other backend's.
    @triton.jit
    def sqrt_rn(x):
        return tl.inline_asm_elementwise("sqrt.rn.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def div_rn(x, y):
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32, is_pure=True,
                                         pack=1)


if INTERPRETED:
    def loop_bound(x):
        # The interpreter's scalars are 1-element arrays, which range() refuses on some Triton
        # versions (3.0-3.6 with a current numpy): hand it a Python int.
        return int(x.handle.data.reshape(-1)[0])
else:
    @triton.jit
    def loop_bound(x):
        return x


@device_function
def chunk_of(layout_ptr, addrs_ptr, c, n, BLOCK: tl.constexpr):
    """Tensor index, the range ``[lo, hi)`` of this chunk's elements, the tensor's first chunk, its
    pointers' flags and head.

    Chunk k of a tensor covers its elements ``[k * chunk + head, (k + 1) * chunk + head)`` (clipped
    to the tensor), and its first chunk also the head ``[0, head)``: with an aligned ``p + head``,
    each full block of a chunk starts 16-byte aligned, since ``k * chunk`` is a multiple of
    ``BLOCK`` (every chunk size is)."""
    t = tl.load(layout_ptr + 4 * n + c)
    numel = tl.load(layout_ptr + t)
    first = tl.load(layout_ptr + n + t)
    chunk = tl.load(layout_ptr + 3 * n + t)
    flags = tl.load(addrs_ptr + 2 * n + t)
    head = flags >> HEAD_SHIFT
    start = tl.multiple_of((c - first) * chunk, BLOCK)
    lo = tl.minimum(start + head, numel)
    hi = tl.minimum(start + chunk + head, numel)
    return t, start, lo, hi, first, flags, head


@device_function
def tensor_addrs(addrs_ptr, t, n):
    """The int64 addresses of tensor ``t``'s parameter and gradient."""
    return tl.load(addrs_ptr + t), tl.load(addrs_ptr + n + t)


@device_function
def as_ptr(addr, DTYPE: tl.constexpr):
    return addr.to(tl.pointer_type(DTYPE))


@device_function
def as_aligned_ptr(addr, head, DTYPE: tl.constexpr):
    """A pointer promised to be 16-byte aligned (the host checked). Call it only inside the branch
    that checked the flag: ``multiple_of`` marks the op that made its argument, so a pointer
    shared with another path would carry the promise there too (and fault on a GPU)."""
    # The element width by pointer arithmetic: Triton 3.2 has no attributes on a constexpr dtype.
    width = (addr.to(tl.pointer_type(DTYPE)) + 1).to(tl.int64) - addr
    return tl.multiple_of((addr + head * width).to(tl.pointer_type(DTYPE)), 16)
