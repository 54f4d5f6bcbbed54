"""The triton backend: host side of the kernels in ``fromage_fused.kernels``.

A group of ``n`` tensors is cut into chunks (every tensor gets at least one; large tensors get
larger chunks), so one program handles one chunk whether the group is one huge tensor or
thousands of tiny ones. A step is three launches per group whatever ``n`` is: per-chunk partial
sums, per-tensor reduction, and the update (for Fromage: any rule's pass is one launch, plus one
if it reduces sums). The kernels are generic (``kernels/engine_pass.py``) and call the rule's
helpers (``kernels/rule_<name>.py``). The tensors are described to the kernels by int64 tables in
device memory (see ``kernels/fromage_table.py``), cached by the sizes and by the storage
addresses, so a new gradient storage (``zero_grad(set_to_none=True)``) costs one small
host-to-device copy, from a pinned buffer that the cache entry owns.

CUDA graphs: a table used while a graph is captured is held (every replay reads it, and a captured
upload re-reads its host buffer), so a table miss inside capture just works: its host buffer comes
from a pinned staging pool set aside outside capture, and the graph replays that small copy. At
most ``GRAPH_TABLE_LIMIT`` tables are held per backend; past it, a capture that needs another
raises, until :func:`fromage_fused.release_graph_tables` lets them go. One backend instance serves
every optimizer: its cache is guarded by a lock.
``torch.compile``: a pass is the custom op ``fromage_fused_triton::pass_`` (schema and fake in
``engine/ops.py``), so a compiled step treats it as opaque and never traces the tables.

On CUDA the kernels are compiled; on CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first use), which exists for tests and ranks below foreach.
"""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import pkgutil
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import FrozenSet, List, Optional

import torch

from ..engine import capture
from ..engine import ops as _ops
from ..engine.dtypes import KERNEL_DTYPES
from ..engine.groups import PlanList
from ..engine.rule import TensorScalar
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


def block_for(cfg: Config, lists: int, writes: int, sums: int, sr: bool = False) -> int:
    """Elements per block of a pass of ``lists`` lists: the config's for two lists, fewer for more
    (the values a thread holds grow with the lists, the written ones, the sums and stochastic
    rounding's hash; the sm_90 cubins of every rule's passes stay within 64 registers:
    tests/test_triton_backend.py). Chunks are multiples of every block size here."""
    if lists <= 2:
        return cfg.block
    if (lists == 3 or (writes <= 1 and sums <= 3)) and not (sr and lists == 4):
        return cfg.block // 2
    return cfg.block // 4
INTERPRETER_CONFIG = Config(block=512, chunk=2048, num_warps=4, rblock=128)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def _kernels():
    from fromage_fused.kernels import engine_pass

    return engine_pass


def kernel_rules() -> FrozenSet[str]:
    """The rules that have Triton helpers (``kernels/rule_<name>.py``), found without importing
    them (importing the kernels decides whether they run under the interpreter)."""
    spec = importlib.util.find_spec("fromage_fused.kernels")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    names = (m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))
    return frozenset(n[len("rule_"):] for n in names if n.startswith("rule_"))


def _rule_kernels(rule):
    """The rule's Triton helpers (``kernels/rule_<name>.py``)."""
    return importlib.import_module(f"fromage_fused.kernels.rule_{rule.name}")


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
    (``engine.groups.PlanList``: its tensors and their addresses do not change while it lives), so the
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


def _flag(addrs, itemsizes, numel=None) -> int:
    """Bit 0: every list's address plus ``head`` elements is 16-byte aligned; ``head`` (the elements
    before, fewer than a 16-byte vector of the first list) in the bits above. True when the lists
    are misaligned alike: views into their buffers at the same element offset. A tensor of
    ``numel`` elements, fewer than that, is all head (the kernels' head block ends there)."""
    first, size = addrs[0], itemsizes[0]
    if first % size:
        return 0
    head = (-first % _ALIGN_BYTES) // size
    if any((a + head * s) % _ALIGN_BYTES for a, s in zip(addrs, itemsizes)):
        return 0
    return 1 | (head if numel is None else min(head, numel)) << 1


def address_values(ptrs, itemsizes=None, numels=None):
    """``(addrs table as ints, PATHS)`` of lists whose addresses are ``ptrs[k]`` and element sizes
    ``itemsizes[k]`` (default 4), of tensors of ``numels`` elements: the addresses list by list,
    then per tensor the flags. The kernels promise 16-byte alignment to the compiler only where the
    flags say it holds."""
    itemsizes = [4] * len(ptrs) if itemsizes is None else list(itemsizes)
    sizes = [None] * len(ptrs[0]) if numels is None else numels
    flags = [_flag(column, itemsizes, numel) for column, numel in zip(zip(*ptrs), sizes)]
    aligned = sum(f & 1 for f in flags)
    paths = _ALIGNED_PATH if aligned == len(flags) else _UNALIGNED_PATH if aligned == 0 else _BOTH_PATHS
    return [a for column in ptrs for a in column] + flags, paths


class _PassPlan:
    """What every launch of one pass takes that follows from the rule, the pass, the flags, the
    group's device and dtype, stochastic rounding and the config (``TritonBackend._pass_plan``)."""

    __slots__ = ("device", "dtypes", "writes", "prev", "scalar_names", "use_sr", "cfg", "s_count", "meta")

    def __init__(self, rule, index, flags, names, writes, param, device, dtype, use_sr, cfg):
        spec = rule.passes[index]
        self.device, self.writes, self.use_sr, self.cfg = device, writes, use_sr, cfg
        self.dtypes = dtypes = tuple(dtype if k in param else torch.float32 for k in range(len(names)))
        # the sums of the last pass before this one that has any (they stay the step's until another replaces them)
        self.prev = next((q.sums for q in reversed(rule.passes[:index]) if q.sums), 0)
        self.scalar_names = [s.name for s in rule.state if isinstance(s, TensorScalar)]
        helpers = _rule_kernels(rule)
        coef, body, fusion = helpers.PASSES[index]
        self.s_count = s_count = spec.sums_for(flags)
        # A pass that writes skips where the rule's tensor lr is not usable (engine.spec.usable_lr).
        lr_slot = getattr(helpers, "LR", None) if writes > 0 else None
        tdt = [_triton_dtype(d) for d in dtypes] + [_triton_dtype(dtypes[0])] * (4 - len(dtypes))
        size = [_ITEMSIZE[d] for d in dtypes] + [_ITEMSIZE[dtypes[0]]] * (4 - len(dtypes))
        self.meta = dict(COEF=coef, BODY=body, L=len(names), W=writes, S=s_count, D0=tdt[0], D1=tdt[1], D2=tdt[2],
                         D3=tdt[3], Z0=size[0], Z1=size[1], Z2=size[2], Z3=size[3], FLAGS=int(flags),
                         BLOCK=block_for(cfg, len(names), writes, s_count, use_sr), SR=use_sr,
                         LR_SLOT=-1 if lr_slot is None else int(getattr(lr_slot, "value", lr_slot)),
                         num_warps=cfg.num_warps, **({} if fusion else {"enable_fp_fusion": False}))


class _Use:
    """Where a phase runs: its device, whether the stream is being captured, the stream itself."""

    __slots__ = ("device", "capturing", "stream")

    def __init__(self, device: torch.device):
        self.device = device
        self.capturing = capture.capturing(device)
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
    dtypes = KERNEL_DTYPES

    def __init__(self, config: Optional[Config] = None):
        self.config = config
        self._tables: "OrderedDict[tuple, _Table]" = OrderedDict()
        self._lock = threading.Lock()  # the tables and the staging pool, for every thread
        self._pool = _StagingPool()
        self._admitted = set()  # (device, dtype) pairs checked to run here
        # (rule, pass, flags) -> the pass's lists; (those, device, dtype, rounding, config) -> _PassPlan
        self._pass_plans = {}
        self.table_builds = 0
        self.token = next(_TOKENS)
        _INSTANCES[self.token] = self
        # Found once: a compiled step builds its plan while it is traced, and the search for a
        # rule's module (importlib's find_spec) breaks the graph on older torch (2.6).
        self.rules = kernel_rules()

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

    def has_rule(self, rule) -> bool:
        return rule.name in self.rules

    # -- checks ---------------------------------------------------------------------------------

    def _group(self, lists, first: int = 0):
        """``(device, dtype)`` of a group (list ``first`` holds parameters). The step plan hands over
        validated groups; a direct call is checked here once per (device, dtype), and tensor by
        tensor whenever its tables are built (a cached table stands for tensors that were checked)."""
        if not lists[0] or any(len(x) != len(lists[0]) for x in lists):
            raise ValueError(f"the triton backend steps a non-empty group of tensor lists of equal length, "
                             f"got lengths {[len(x) for x in lists]}")
        device, dtype = lists[first][0].device, lists[first][0].dtype
        if (device, dtype) not in self._admitted:
            if not self.supports_dtype(dtype):
                raise TypeError(f"the triton backend steps {[str(d) for d in self.dtypes]} tensors, not {dtype}")
            reason = self.unavailable_reason(device)
            if reason is not None:
                raise RuntimeError(f"the triton backend cannot run on {device}: {reason}")
            self._admitted.add((device, dtype))
        return device, dtype

    @staticmethod
    def _check_tensors(lists, dtypes, device):
        for k, (tensors, dtype) in enumerate(zip(lists, dtypes)):
            for i, (x, p) in enumerate(zip(tensors, lists[0])):
                if x.dtype != dtype or x.device != device:
                    raise RuntimeError(f"tensor {i} of list {k} of a triton group is not {dtype} on {device} "
                                       "like the first")
                if x.shape != p.shape:
                    raise RuntimeError(f"tensor {i}: shape {tuple(x.shape)} in list {k}, {tuple(p.shape)} in list 0")

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

    def _tables_for(self, lists, dtypes, cfg, use: _Use):
        """``(layout, addresses)`` tables of a pass's lists: the keys read once per list (per plan for
        parameters and buffers, per step for gradients: see ``_memo``)."""
        device = use.device
        numels = _memo(lists[0], (self.token, "numels"), lambda: tuple(map(_numel, lists[0])))
        ptrs = tuple(_memo(x, (self.token, "ptrs"), lambda x=x: tuple(map(_data_ptr, x))) for x in lists)

        def layout():
            self._check_tensors(lists, dtypes, device)
            return layout_values(numels, cfg)

        def addresses():
            self._check_tensors(lists, dtypes, device)
            self.table_builds += 1
            return address_values(ptrs, [_ITEMSIZE[d] for d in dtypes], numels)

        lay = self._table(("layout", device, cfg, numels), use, layout)
        addrs = self._table(("addrs", device, dtypes, ptrs, numels), use, addresses)
        return lay, addrs

    # -- a pass ---------------------------------------------------------------------------------------

    def run_pass(self, rule, index, call):
        scalars = list(call.scalar_list)
        if torch.compiler.is_compiling():
            lists, w = call.lists, call.writes
            out = _ops.call(torch.ops.fromage_fused_triton,
                            rule.name, index, [t for x in lists[:w] for t in x], [t for x in lists[w:] for t in x],
                            call.sums, call.hyper, call.flags, scalars, rule.kernel_globals(call), call.found_inf,
                            call.grad_scale, call.seed, self.token)
        else:
            out = self._run(rule, index, call.lists, call.sums, call.hyper, call.flags, scalars,
                            rule.kernel_globals(call), call.found_inf, call.grad_scale, call.seed)
            if call.writes:
                # The kernels write through raw pointers: bump the version counters as torch's
                # in-place ops do (the custom op above gets this from torch.library), so that a
                # backward that saved a written tensor before the step raises instead of using the
                # new values.
                written = (call.lists[0] if call.writes == 1 and not scalars
                           else [t for x in call.lists[:call.writes] for t in x] + scalars)
                torch.autograd.graph.increment_version(written)
        return out if rule.passes[index].sums_for(call.flags) else None

    def _pass_plan(self, rule, index, flags, lists, seed) -> "_PassPlan":
        """What a pass's launches take that follows from the rule, the pass, the flags and the
        group's device and dtype: derived once, then looked up."""
        lists_key = (rule, index, flags)
        shape = self._pass_plans.get(lists_key)
        if shape is None:
            names, writes = rule.passes[index].lists_for(flags)
            param = [k for k, name in enumerate(names) if name in ("p", "g")]
            shape = self._pass_plans[lists_key] = (names, writes, param)
        names, writes, param = shape
        device, dtype = self._group(lists, param[0])
        use_sr = seed is not None and dtype == torch.bfloat16 and any(k in param for k in range(writes))
        cfg = self._config(device, dtype)
        key = (rule, index, flags, device, dtype, use_sr, cfg)
        plan = self._pass_plans.get(key)
        if plan is None:
            plan = self._pass_plans[key] = _PassPlan(rule, index, flags, names, writes, param, device, dtype, use_sr,
                                                     cfg)
        return plan

    def _run(self, rule, index, lists, sums, hyper, flags, scalars, globals_, found_inf, grad_scale, seed):
        plan = self._pass_plan(rule, index, flags, lists, seed)
        device, dtypes, writes, prev, use_sr = plan.device, plan.dtypes, plan.writes, plan.prev, plan.use_sr
        n = len(lists[0])
        if sums is not None and (tuple(sums.shape) != (n, prev) or sums.device != device):
            raise RuntimeError(f"the stats of the previous pass must be an [{n}, {prev}] tensor on {device}, got "
                               f"{tuple(sums.shape)} on {sums.device}")
        for name, m in zip(plan.scalar_names, scalars):
            if tuple(m.shape) != (n,) or m.dtype != torch.float32 or m.device != device or not m.is_contiguous():
                raise RuntimeError(f"{name} must be a contiguous [{n}] float32 tensor on {device}")
        # Strided tensors are worked on in contiguous copies; the written ones are written back.
        work = [_dense(x) for x in lists]
        kernels = _kernels()
        cfg = plan.cfg
        hyper = hyper.to(torch.float32).contiguous()
        sums = None if sums is None else sums.to(torch.float32).contiguous()
        with _on(device):
            use = _Use(device)
            layout, addrs = self._tables_for(work, dtypes, cfg, use)
            s_count = plan.s_count
            partials = torch.empty(layout.programs, max(s_count, 1), dtype=torch.float32, device=device)
            out = torch.empty(n, s_count, dtype=torch.float32, device=device)
            dummy = hyper
            s0 = scalars[0] if len(scalars) > 0 else dummy
            s1 = scalars[1] if len(scalars) > 1 else dummy
            skip = found_inf is not None and writes > 0
            fi = found_inf.to(device=device, dtype=torch.float32).reshape(()) if skip else dummy
            gs = grad_scale.to(device=device, dtype=torch.float32).reshape(()) if grad_scale is not None else dummy
            sd = seed.to(device=device, dtype=torch.int64).reshape(()) if use_sr else addrs.device
            _launch(kernels.pass_kernel, (layout.programs,), layout.device, addrs.device, partials,
                    dummy if sums is None else sums, hyper, s0, s1, dummy if globals_ is None else globals_, fi, gs,
                    sd, n, HAS_FOUND_INF=skip, HAS_GRAD_SCALE=grad_scale is not None, PATHS=addrs.programs,
                    **plan.meta)
            if s_count:
                _launch(kernels.reduce_kernel, (n,), layout.device, partials, out, n, S=s_count, RBLOCK=cfg.rblock,
                        num_warps=4)
        for k in range(writes):
            if work[k] is not lists[k]:
                for x, w in zip(lists[k], work[k]):
                    if w is not x:
                        x.copy_(w)
        return out


# -- a pass as a custom op: what torch.compile sees (opaque, with the engine's fake) ------------------

def _pass_op(rule: str, index: int, writes: List[torch.Tensor], reads: List[torch.Tensor], sums: Optional[torch.Tensor],
             hyper: torch.Tensor, flags: int, scalars: List[torch.Tensor], globals: Optional[torch.Tensor],
             found_inf: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor], seed: Optional[torch.Tensor],
             backend: int) -> torch.Tensor:
    from ..rules import registered

    the_rule = registered()[rule]
    count = len(the_rule.passes[index].lists_for(flags)[0])
    tensors = list(writes) + list(reads)
    n = len(tensors) // count
    lists = [tensors[k * n:(k + 1) * n] for k in range(count)]
    return _INSTANCES[backend]._run(the_rule, index, lists, sums, hyper, flags, list(scalars), globals, found_inf,
                                    grad_scale, seed)


_ops.define(_ops.TRITON, _pass_op)


BACKEND = TritonBackend()
