"""The triton backend: host side of the kernels in ``fromage_fused.kernels``.

A group of ``n`` tensors is cut into chunks (every tensor gets at least one; large tensors get
larger chunks), so one program handles one chunk whether the group is one huge tensor or
thousands of tiny ones. A step is three launches per group whatever ``n`` is: per-chunk partial
sums, per-tensor reduction, and the update. The tensors are described to the kernels by int64
tables in device memory (see ``kernels/fromage_table.py``), cached by the sizes and by the storage
addresses, so a new gradient storage (``zero_grad(set_to_none=True)``) costs one small
host-to-device copy, from a pinned buffer that the cache entry owns.

CUDA graphs: a table used while a graph is captured is held (every replay reads it, and a captured
upload re-reads its host buffer), so a table miss inside capture just works: its host buffer comes
from a pinned staging pool set aside outside capture, and the graph replays that small copy. At
most ``GRAPH_TABLE_LIMIT`` tables are held per backend; past it, a capture that needs another
raises, until :func:`fromage_fused.release_graph_tables` lets them go. One backend instance serves
every optimizer: its cache is guarded by a lock.
``torch.compile``: the two phases are custom ops (``fromage_fused_triton::stats`` / ``apply_``)
with fake implementations, so a compiled step treats them as opaque and never traces the tables.

On CUDA the kernels are compiled; on CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first use), which exists for tests and ranks below foreach.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional

import torch

from .._groups import PlanList
from ._base import Backend

_ALIGN_BYTES = 16
_CACHE_SIZE = 64  # tables per backend; a group uses a layout and an address table
#: tables held for captured CUDA graphs, per backend (see release_graph_tables)
GRAPH_TABLE_LIMIT = 256
#: int64 words the staging pool keeps free outside capture: at least this, and twice the largest table
_STAGING_MIN_FREE = 32768
_LARGE_CHUNKS = 4  # a tensor of at least this many large chunks is cut into large chunks

_ITEMSIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous


@dataclass(frozen=True)
class Config:
    """Work split: ``block`` elements per inner step; ``chunk`` (a multiple of ``block``) per
    program, or ``large_chunk`` for tensors of at least 4 large chunks (fewer, longer programs)."""

    block: int
    chunk: int
    num_warps: int = 4
    rblock: int = 128
    large_chunk: Optional[int] = None

    def __post_init__(self):
        if self.block & (self.block - 1) or self.block < 8:
            raise ValueError(f"block must be a power of two >= 8, got {self.block}")
        for name in ("chunk", "large_chunk"):
            value = getattr(self, name)
            if value is not None and (value <= 0 or value % self.block):
                raise ValueError(f"{name} ({value}) must be a positive multiple of block ({self.block})")

    def chunk_for(self, numel: int) -> int:
        large = self.large_chunk
        return large if large is not None and numel >= _LARGE_CHUNKS * large else self.chunk


# Per dtype on CUDA: 8 warps, each thread with 8 elements per operand and inner step (two 16-byte
# vectors in fp32, one in bf16/fp16). 16 elements per thread would take 84-105 registers in the
# 16-bit kernels (two programs of 256 threads per SM); 8 keep every kernel at 64 or fewer
# (tests/test_triton_backend.py reads them from the sm_90 cubin).
CUDA_CONFIGS = {
    torch.float32: Config(block=2048, chunk=16384, num_warps=8, rblock=1024, large_chunk=65536),
    torch.bfloat16: Config(block=2048, chunk=16384, num_warps=8, rblock=1024, large_chunk=65536),
    torch.float16: Config(block=2048, chunk=16384, num_warps=8, rblock=1024, large_chunk=65536),
}
CUDA_CONFIG = CUDA_CONFIGS[torch.float32]
INTERPRETER_CONFIG = Config(block=512, chunk=2048, num_warps=4, rblock=128)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def _kernels():
    from fromage_fused.kernels import fromage_apply, fromage_stats

    return fromage_stats, fromage_apply


def _kernels_interpreted() -> Optional[bool]:
    """Whether the kernels were decorated under the interpreter; None if not imported yet."""
    import sys

    mod = sys.modules.get("fromage_fused.kernels.fromage_table")
    return None if mod is None else bool(mod.INTERPRETED)


def _on(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the group's.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel, grid, *args, **meta):
    """Every kernel launch of this backend goes through here (tests count them)."""
    kernel[grid](*args, **meta)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream (of the current device, set by ``_on``) is being captured."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _dense(tensors):
    """Kernels see flat storage: a strided view goes through a contiguous copy (one C-level pass
    when every tensor is contiguous, the common case; none for a step plan's list, contiguous by
    the contract of ``_base.py``)."""
    if type(tensors) is PlanList or all(map(_is_contiguous, tensors)):
        return tensors
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _memo(tensors, key, derive):
    """``derive()`` of a tensor list, kept in the list's memo when it is a step plan's
    (``_groups.PlanList``: its tensors and their addresses do not change while it lives), so the
    table keys of a group are read once per plan (parameters) or per step (gradients)."""
    if type(tensors) is not PlanList:
        return derive()
    value = tensors.memo.get(key)
    if value is None:
        value = tensors.memo[key] = derive()
    return value


def layout_values(numels, cfg: Config):
    """``(layout table as ints, number of programs)`` for tensors of these sizes (see
    ``kernels/fromage_table.py``)."""
    chunks = [cfg.chunk_for(size) for size in numels]
    counts = [max(1, -(-size // chunk)) for size, chunk in zip(numels, chunks)]
    first = list(itertools.accumulate(counts, initial=0))
    owner = [t for t, count in enumerate(counts) for _ in range(count)]
    return list(numels) + first[:-1] + counts + chunks + owner, first[-1]


# The PATHS a launch compiles (kernels/fromage_table.py): only the aligned path, only the other, both.
_ALIGNED_PATH, _UNALIGNED_PATH, _BOTH_PATHS = 1, 2, 3


def _flag(a: int, b: int, itemsize: int) -> int:
    """Bit 0: ``p + head`` and ``g + head`` are both 16-byte aligned; ``head`` (the elements before)
    in the bits above. True when the two addresses are misaligned by the same whole number of
    elements: views into their buffers at the same offset."""
    if (a - b) % _ALIGN_BYTES or a % itemsize:
        return 0
    head = (-a % _ALIGN_BYTES) // itemsize
    return 1 | head << 1


def address_values(ptrs_p, ptrs_g, itemsize: int = 4):
    """``(addrs table as ints, PATHS)``. The kernels promise 16-byte alignment to the compiler only
    where the flags say it holds."""
    flags = [_flag(a, b, itemsize) for a, b in zip(ptrs_p, ptrs_g)]
    aligned = sum(f & 1 for f in flags)
    paths = _ALIGNED_PATH if aligned == len(flags) else _UNALIGNED_PATH if aligned == 0 else _BOTH_PATHS
    return list(ptrs_p) + list(ptrs_g) + flags, paths


class _Use:
    """Where a phase runs: its device, whether the stream is being captured, the stream itself."""

    __slots__ = ("device", "capturing", "stream")

    def __init__(self, device: torch.device):
        self.device = device
        self.capturing = _capturing(device)
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None


def _pinned(words: int) -> torch.Tensor:
    return torch.empty(words, dtype=torch.int64, pin_memory=True)


def _pinned_copy(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, pin_memory=True)


class _StagingPool:
    """Pinned host memory for the uploads made while a CUDA graph is captured, set aside outside
    capture: allocating pinned memory inside a capture fails on older torch (and the graph replays
    the copy from it at every replay, so the buffer must stay). ``reserve`` (outside capture) keeps
    enough free; ``take`` (inside) hands out a slice and never allocates. A slice is never handed
    out again; its segment lives as long as some table holds a slice of it."""

    def __init__(self, allocate=None, min_free: int = _STAGING_MIN_FREE):
        self._allocate = allocate
        self._min_free = min_free
        self._segment: Optional[torch.Tensor] = None
        self._used = 0
        self._largest = 0

    def free(self) -> int:
        return 0 if self._segment is None else self._segment.numel() - self._used

    def reserve(self, words: int) -> None:
        self._largest = max(self._largest, words)
        want = max(self._min_free, 2 * self._largest)
        if self.free() < want:
            self._segment = (self._allocate or _pinned)(2 * want)
            self._used = 0

    def take(self, words: int) -> Optional[torch.Tensor]:
        if self.free() < words:
            return None
        out = self._segment[self._used:self._used + words]
        self._used += words
        return out

    def clear(self) -> None:
        """A fresh segment at the next reserve (the slices handed out stay with their tables)."""
        self._segment, self._used = None, 0


class _Table:
    """An int64 table in device memory and the host buffer it was uploaded from (kept as long as the
    entry: a captured upload copies from it again at every replay). ``programs``: the launch's
    program count for a layout table, the kernels' PATHS for an address table."""

    __slots__ = ("device", "host", "programs", "held", "streams")

    def __init__(self, values, use: _Use, programs: int, pool: _StagingPool):
        self.programs = programs
        self.held = use.capturing  # a captured graph reads it
        if use.stream is not None:
            staged = pool.take(len(values)) if use.capturing else None
            if staged is None:  # eager, or inside a capture that the pool cannot serve
                self.host = _pinned_copy(values)
            else:
                self.host = staged
                self.host.copy_(torch.tensor(values, dtype=torch.int64))
            if not use.capturing:
                pool.reserve(len(values))
            self.device = torch.empty(len(values), dtype=torch.int64, device=use.device)
            self.device.copy_(self.host, non_blocking=True)
            self.streams = {use.stream.cuda_stream}
        else:  # the interpreter reads host memory
            self.host = None
            self.device = torch.tensor(values, dtype=torch.int64)
            self.streams = set()

    def used(self, use: _Use) -> None:
        if use.capturing:
            self.held = True
        elif use.stream is not None and use.stream.cuda_stream not in self.streams:
            # Read on another stream than the one it was made on: when it is evicted, the
            # allocator must wait for this stream's work too before reusing the memory.
            self.device.record_stream(use.stream)
            self.streams.add(use.stream.cuda_stream)


_CAPTURE_UPLOAD_FAILED = (
    "the triton backend needed a new tensor table inside CUDA graph capture (new parameter or gradient "
    "storage) and could not upload it there: {}. Keep the gradients' storage of the warm-up steps instead: "
    "call zero_grad(set_to_none=False) before capturing (or capture after a step on the same storage)"
)

GRAPH_TABLES_FULL = (
    "the {backend} backend holds {limit} tensor tables for captured CUDA graphs, its limit: a graph reads "
    "its tables at every replay, so each capture that sees new parameter or gradient storage holds new "
    "ones for good. Capture on the storage of the warm-up steps (zero_grad(set_to_none=False)), or, once "
    "the graphs that used them are freed and will not replay, call fromage_fused.release_graph_tables()"
)

_INSTANCES: "weakref.WeakValueDictionary[int, TritonBackend]" = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


class TritonBackend(Backend):
    name = "triton"
    priority = 30
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, config: Optional[Config] = None):
        self.config = config
        self._tables: "OrderedDict[tuple, _Table]" = OrderedDict()
        self._lock = threading.Lock()  # the tables and the staging pool, for every thread
        self._pool = _StagingPool()
        self._admitted = set()  # (device, dtype) pairs checked to run here
        self.table_builds = 0
        self.token = next(_TOKENS)
        _INSTANCES[self.token] = self

    # -- availability -------------------------------------------------------------------------

    def unavailable_reason(self, device):
        device = torch.device(device)
        if importlib.util.find_spec("triton") is None:
            if device.type == "cuda":
                return "Triton is not installed (CUDA builds of torch bring it; or pip install triton)"
            return f"Triton kernels run on CUDA GPUs, not on {device.type} tensors (and Triton is not installed)"
        if importlib.util.find_spec("fromage_fused.kernels") is None:
            return "the kernels package fromage_fused.kernels is missing: install fromage_fused (pip install -e .)"
        interpreted = _kernels_interpreted()
        if interpreted is None:
            interpreted = _interpret_requested()
        if device.type == "cuda":
            if interpreted:
                return "the Triton interpreter is on (TRITON_INTERPRET=1): it cannot run on CUDA tensors"
            if not torch.cuda.is_available():
                return "no CUDA device is available"
            return None
        if device.type == "cpu":
            if not interpreted:
                return "Triton runs on CPU only under its interpreter (set TRITON_INTERPRET=1 before the first step)"
            return None
        return f"Triton kernels do not run on {device.type} tensors"

    def priority_on(self, device):
        # The interpreter is for tests: on CPU, foreach is always the better choice.
        return self.priority if torch.device(device).type == "cuda" else 5

    def _config(self, device: torch.device, dtype: torch.dtype) -> Config:
        if self.config is not None:
            return self.config
        return CUDA_CONFIGS[dtype] if device.type == "cuda" else INTERPRETER_CONFIG

    # -- checks ---------------------------------------------------------------------------------

    def _group(self, params, grads):
        """``(device, dtype)`` of a group. The step plan hands over validated groups; a direct call
        is checked here once per (device, dtype), and tensor by tensor whenever its tables are
        built (a cached table stands for tensors that were checked)."""
        if not params or len(params) != len(grads):
            raise ValueError(f"the triton backend steps a non-empty group of (parameter, gradient) pairs, "
                             f"got {len(params)} parameters and {len(grads)} gradients")
        device, dtype = params[0].device, params[0].dtype
        if (device, dtype) not in self._admitted:
            if not self.supports_dtype(dtype):
                raise TypeError(f"the triton backend steps {[str(d) for d in self.dtypes]} tensors, not {dtype}")
            reason = self.unavailable_reason(device)
            if reason is not None:
                raise RuntimeError(f"the triton backend cannot run on {device}: {reason}")
            self._admitted.add((device, dtype))
        return device, dtype

    @staticmethod
    def _check_tensors(params, grads, device, dtype):
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.dtype != dtype or g.dtype != dtype or p.device != device or g.device != device:
                raise RuntimeError(f"tensor {i} of a triton group is not {dtype} on {device} like the first")
            if p.shape != g.shape:
                raise RuntimeError(f"tensor {i}: parameter shape {tuple(p.shape)} != gradient shape {tuple(g.shape)}")

    # -- tables ---------------------------------------------------------------------------------

    def _table(self, key, use: _Use, build):
        with self._lock:
            hit = self._tables.get(key)
            if use.capturing and (hit is None or not hit.held):
                held = sum(1 for t in self._tables.values() if t.held)
                if held >= GRAPH_TABLE_LIMIT:
                    raise RuntimeError(GRAPH_TABLES_FULL.format(backend=self.name, limit=GRAPH_TABLE_LIMIT))
            if hit is not None:
                self._tables.move_to_end(key)
                hit.used(use)
                return hit
            values, programs = build()
            try:
                table = _Table(values, use, programs, self._pool)
            except RuntimeError as exc:
                if not use.capturing:
                    raise
                raise RuntimeError(_CAPTURE_UPLOAD_FAILED.format(exc)) from exc
            self._tables[key] = table
            if len(self._tables) > _CACHE_SIZE:
                for old in [k for k, t in self._tables.items() if not t.held][:len(self._tables) - _CACHE_SIZE]:
                    del self._tables[old]
            return table

    def release_graph_tables(self) -> int:
        """Tables held for captured CUDA graphs become ordinary cache entries again (evicted as any);
        returns how many. Call only when no graph that used them will replay."""
        with self._lock:
            released = 0
            for table in self._tables.values():
                released += table.held
                table.held = False
            self._pool.clear()
            while len(self._tables) > _CACHE_SIZE:
                self._tables.popitem(last=False)
            return released

    def _tables_for(self, params, grads, dtype, cfg, use: _Use):
        """``(layout, addresses)`` tables of a group: one pass over the tensors for the keys."""
        device = use.device
        numels, ptrs_p = _memo(params, (self.token, "params"), lambda: (tuple(map(_numel, params)), tuple(map(_data_ptr, params))))
        ptrs_g = _memo(grads, (self.token, "grads"), lambda: tuple(map(_data_ptr, grads)))

        def layout():
            self._check_tensors(params, grads, device, dtype)
            return layout_values(numels, cfg)

        def addresses():
            self._check_tensors(params, grads, device, dtype)
            self.table_builds += 1
            values, paths = address_values(ptrs_p, ptrs_g, _ITEMSIZE[dtype])
            return values, paths

        lay = self._table(("layout", device, cfg, numels), use, layout)
        addrs = self._table(("addrs", device, dtype, ptrs_p, ptrs_g), use, addresses)
        return lay, addrs

    # -- the two phases -----------------------------------------------------------------------------

    def stats(self, params, grads, *, inner=True):
        if torch.compiler.is_compiling():
            return torch.ops.fromage_fused_triton.stats(list(params), list(grads), bool(inner), self.token)
        return self._stats(params, grads, inner)

    def apply(self, params, grads, stats, *, lr, max_norm, p_bound, maximize, prefactor=True,
              found_inf=None, grad_scale=None, sr_seed=None):
        if torch.compiler.is_compiling():
            torch.ops.fromage_fused_triton.apply_(
                list(params), list(grads), stats, lr, max_norm if p_bound is not None else None,
                None if p_bound is None else float(p_bound), bool(maximize), bool(prefactor),
                found_inf, grad_scale, sr_seed, self.token)
            return
        self._apply(params, grads, stats, lr, max_norm, p_bound, maximize, prefactor, found_inf, grad_scale, sr_seed)
        # The kernels write through raw pointers: bump the version counters as torch's in-place
        # ops do (the custom op above gets this from torch.library), so that a backward that saved
        # a parameter before the step raises instead of using the new values.
        torch.autograd.graph.increment_version(list(params) if p_bound is None else [*params, max_norm])

    def _stats(self, params, grads, inner):
        device, dtype = self._group(params, grads)
        params, grads = _dense(params), _dense(grads)
        stats_k, _ = _kernels()
        cfg = self._config(device, dtype)
        n = len(params)
        with _on(device):
            layout, addrs = self._tables_for(params, grads, dtype, cfg, _Use(device))
            partials = torch.empty(layout.programs, 3, dtype=torch.float32, device=device)
            stats = torch.empty(n, 3, dtype=torch.float32, device=device)
            _launch(stats_k.partials_kernel, (layout.programs,), layout.device, addrs.device, partials, n,
                    DTYPE=_triton_dtype(dtype), BLOCK=cfg.block, INNER=bool(inner), PATHS=addrs.programs,
                    num_warps=cfg.num_warps)
            _launch(stats_k.reduce_kernel, (n,), layout.device, partials, stats, n, RBLOCK=cfg.rblock, num_warps=4)
        return stats

    def _apply(self, params, grads, stats, lr, max_norm, p_bound, maximize, prefactor, found_inf, grad_scale,
               sr_seed):
        device, dtype = self._group(params, grads)
        n = len(params)
        if tuple(stats.shape) != (n, 3) or stats.device != device:
            raise RuntimeError(f"stats must be an [{n}, 3] tensor on {device}, got {tuple(stats.shape)} on {stats.device}")
        if p_bound is not None and (
            max_norm is None or tuple(max_norm.shape) != (n,) or max_norm.dtype != torch.float32
            or max_norm.device != device or not max_norm.is_contiguous()
        ):
            raise RuntimeError(f"p_bound is set: pass max_norm as a contiguous [{n}] float32 tensor on {device}")
        # Strided parameters are updated in a contiguous copy and written back afterwards.
        work, grads = _dense(params), _dense(grads)
        _, apply_k = _kernels()
        cfg = self._config(device, dtype)
        stats = stats.to(torch.float32).contiguous()
        lr = lr.to(device=device, dtype=torch.float32).reshape(())
        use_sr = sr_seed is not None and dtype == torch.bfloat16
        with _on(device):
            use = _Use(device)
            layout, addrs = self._tables_for(work, grads, dtype, cfg, use)
            mn = max_norm if p_bound is not None else lr
            seed = sr_seed.to(device=device, dtype=torch.int64).reshape(()) if use_sr else addrs.device
            fi = found_inf.to(device=device, dtype=torch.float32).reshape(()) if found_inf is not None else lr
            gs = grad_scale.to(device=device, dtype=torch.float32).reshape(()) if grad_scale is not None else lr
            _launch(apply_k.apply_kernel, (layout.programs,), layout.device, addrs.device, mn, stats, lr, fi, gs,
                    seed, float(p_bound) if p_bound is not None else 0.0, n, DTYPE=_triton_dtype(dtype),
                    BLOCK=cfg.block, HAS_BOUND=p_bound is not None, MAXIMIZE=bool(maximize),
                    PREFACTOR=bool(prefactor), HAS_FOUND_INF=found_inf is not None,
                    HAS_GRAD_SCALE=grad_scale is not None, SR=use_sr, PATHS=addrs.programs, num_warps=cfg.num_warps,
                    **apply_k.LAUNCH_OPTIONS)
        if work is not params:
            for p, w in zip(params, work):
                if w is not p:
                    p.copy_(w)


# -- the phases as custom ops: what torch.compile sees (opaque, with fake implementations) -----------

@torch.library.custom_op("fromage_fused_triton::stats", mutates_args=(),
                         schema="(Tensor[] params, Tensor[] grads, bool inner, int backend) -> Tensor")
def _stats_op(params: List[torch.Tensor], grads: List[torch.Tensor], inner: bool, backend: int) -> torch.Tensor:
    return _INSTANCES[backend]._stats(params, grads, inner)


@_stats_op.register_fake
def _(params, grads, inner, backend):
    return params[0].new_empty((len(params), 3), dtype=torch.float32)


@torch.library.custom_op(
    "fromage_fused_triton::apply_", mutates_args=("params", "max_norm"),
    schema="(Tensor(a!)[] params, Tensor[] grads, Tensor stats, Tensor lr, Tensor(b!)? max_norm, float? p_bound, "
           "bool maximize, bool prefactor, Tensor? found_inf, Tensor? grad_scale, Tensor? sr_seed, int backend) -> ()")
def _apply_op(params: List[torch.Tensor], grads: List[torch.Tensor], stats: torch.Tensor, lr: torch.Tensor,
              max_norm: Optional[torch.Tensor], p_bound: Optional[float], maximize: bool, prefactor: bool,
              found_inf: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor], sr_seed: Optional[torch.Tensor],
              backend: int) -> None:
    _INSTANCES[backend]._apply(params, grads, stats, lr, max_norm if p_bound is not None else None, p_bound, maximize,
                               prefactor, found_inf, grad_scale, sr_seed)


@_apply_op.register_fake
def _(params, grads, stats, lr, max_norm, p_bound, maximize, prefactor, found_inf, grad_scale, sr_seed, backend):
    return None


BACKEND = TritonBackend()
