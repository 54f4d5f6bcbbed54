"""The triton backend: host side of the kernels in ``fromage_fused.kernels``.

A group of ``n`` tensors is cut into fixed-size chunks (every tensor gets at least one), so one
program handles one chunk whether the group is one huge tensor or thousands of tiny ones. A step
is three launches per group whatever ``n`` is: per-chunk partial sums, per-tensor reduction, and
the update. The tensors are described to the kernels by two int64 tables in device memory (see
``kernels/fromage_table.py``), cached by the sizes and by the storage addresses, so a new gradient
storage (``zero_grad(set_to_none=True)``) costs one small host-to-device copy.

On CUDA the kernels are compiled; on CPU they run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first use), which exists for tests and ranks below foreach.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ._base import Backend

_ALIGN_BYTES = 16
_ALIGNED_FLAG = 1  # kernels/fromage_table.py: ALIGNED_FLAG
_CACHE_SIZE = 64  # entries per cache; a group uses two address tables and one layout


@dataclass(frozen=True)
class Config:
    """Work split: ``block`` elements per inner step, ``chunk`` (a multiple of ``block``) per program."""

    block: int
    chunk: int
    num_warps: int = 4
    rblock: int = 128

    def __post_init__(self):
        if self.block & (self.block - 1) or self.block < 8:
            raise ValueError(f"block must be a power of two >= 8, got {self.block}")
        if self.chunk % self.block:
            raise ValueError(f"chunk ({self.chunk}) must be a multiple of block ({self.block})")


CUDA_CONFIG = Config(block=2048, chunk=16384, num_warps=8, rblock=1024)
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


def _triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _flat(t: torch.Tensor) -> bool:
    return t.is_contiguous()


class TritonBackend(Backend):
    name = "triton"
    priority = 30
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, config: Optional[Config] = None):
        self.config = config
        self._layouts: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._addrs: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.table_builds = 0

    # -- availability -------------------------------------------------------------------------

    def unavailable_reason(self, device):
        device = torch.device(device)
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton)"
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

    def _config(self, device: torch.device) -> Config:
        if self.config is not None:
            return self.config
        return CUDA_CONFIG if device.type == "cuda" else INTERPRETER_CONFIG

    # -- tables ---------------------------------------------------------------------------------

    @staticmethod
    def _remember(cache: OrderedDict, key, value):
        cache[key] = value
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return value

    def _layout(self, numels, device, cfg):
        """``(layout table, number of chunks)`` for these sizes."""
        key = (device, cfg.chunk, numels)
        hit = self._layouts.get(key)
        if hit is not None:
            self._layouts.move_to_end(key)
            return hit
        sizes = np.asarray(numels, dtype=np.int64)
        counts = np.maximum((sizes + cfg.chunk - 1) // cfg.chunk, 1)
        first = np.zeros_like(counts)
        np.cumsum(counts[:-1], out=first[1:])
        owner = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
        table = torch.from_numpy(np.concatenate([sizes, first, counts, owner])).to(device, non_blocking=True)
        return self._remember(self._layouts, key, (table, int(counts.sum())))

    def _addresses(self, ptrs_p, ptrs_g, device):
        key = (device, ptrs_p, ptrs_g)
        hit = self._addrs.get(key)
        if hit is not None:
            self._addrs.move_to_end(key)
            return hit
        self.table_builds += 1
        p = np.asarray(ptrs_p, dtype=np.uint64).astype(np.int64)
        g = np.asarray(ptrs_g, dtype=np.uint64).astype(np.int64)
        # The kernels promise 16-byte alignment to the compiler only where this holds.
        flags = (((p % _ALIGN_BYTES) == 0) & ((g % _ALIGN_BYTES) == 0)).astype(np.int64) * _ALIGNED_FLAG
        table = torch.from_numpy(np.concatenate([p, g, flags])).to(device, non_blocking=True)
        return self._remember(self._addrs, key, table)

    def _tables(self, params, grads, device, cfg):
        layout, chunks = self._layout(tuple(t.numel() for t in params), device, cfg)
        addrs = self._addresses(tuple(t.data_ptr() for t in params), tuple(t.data_ptr() for t in grads), device)
        return layout, chunks, addrs

    def _max_norm_table(self, max_norms, device):
        ptrs = tuple(m.data_ptr() for m in max_norms)
        key = (device, "max_norm", ptrs)
        hit = self._addrs.get(key)
        if hit is not None:
            self._addrs.move_to_end(key)
            return hit
        self.table_builds += 1
        table = torch.from_numpy(np.asarray(ptrs, dtype=np.uint64).astype(np.int64)).to(device, non_blocking=True)
        return self._remember(self._addrs, key, table)

    # -- checks -----------------------------------------------------------------------------------

    def _check(self, params, grads):
        dtype, device = params[0].dtype, params[0].device
        if not self.supports_dtype(dtype):
            raise TypeError(f"the triton backend steps {[str(d) for d in self.dtypes]} tensors, not {dtype}")
        reason = self.unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"the triton backend cannot run on {device}: {reason}")
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.dtype != dtype or g.dtype != dtype or p.device != device or g.device != device:
                raise RuntimeError(f"tensor {i} of a triton group is not {dtype} on {device} like the first")
            if p.shape != g.shape:
                raise RuntimeError(f"tensor {i}: parameter shape {tuple(p.shape)} != gradient shape {tuple(g.shape)}")
        return dtype, device

    # -- the two phases -----------------------------------------------------------------------------

    def stats(self, params, grads, *, inner=True):
        if not params:
            return torch.zeros(0, 3)
        dtype, device = self._check(params, grads)
        # Kernels see flat storage: a strided view is read through a contiguous copy.
        params = [p if _flat(p) else p.contiguous() for p in params]
        grads = [g if _flat(g) else g.contiguous() for g in grads]
        stats_k, _ = _kernels()
        cfg = self._config(device)
        layout, chunks, addrs = self._tables(params, grads, device, cfg)
        n = len(params)
        partials = torch.empty(chunks, 3, dtype=torch.float32, device=device)
        stats = torch.empty(n, 3, dtype=torch.float32, device=device)
        with _on(device):
            _launch(stats_k.partials_kernel, (chunks,), layout, addrs, partials, n, DTYPE=_triton_dtype(dtype),
                    BLOCK=cfg.block, CHUNK=cfg.chunk, INNER=bool(inner), num_warps=cfg.num_warps)
            _launch(stats_k.reduce_kernel, (n,), layout, partials, stats, n, RBLOCK=cfg.rblock, num_warps=4)
        return stats

    def apply(self, params, grads, stats, *, lr, max_norms, p_bound, maximize, prefactor=True,
              found_inf=None, grad_scale=None, sr_seed=None):
        if not params:
            return
        dtype, device = self._check(params, grads)
        n = len(params)
        if tuple(stats.shape) != (n, 3) or stats.device != device:
            raise RuntimeError(f"stats must be an [{n}, 3] tensor on {device}, got {tuple(stats.shape)} on {stats.device}")
        if p_bound is not None and (max_norms is None or len(max_norms) != n):
            raise ValueError("p_bound is set: pass one max_norm tensor per parameter")
        if p_bound is not None:
            for i, m in enumerate(max_norms):
                if m.dtype != torch.float32 or m.numel() != 1 or m.device != device:
                    raise RuntimeError(f"max_norm {i} must be a one-element float32 tensor on {device}")
        # Strided parameters are updated in a contiguous copy and written back afterwards.
        work = [p if _flat(p) else p.contiguous() for p in params]
        grads = [g if _flat(g) else g.contiguous() for g in grads]
        _, apply_k = _kernels()
        cfg = self._config(device)
        layout, chunks, addrs = self._tables(work, grads, device, cfg)
        stats = stats.to(torch.float32).contiguous()
        lr = lr.to(device=device, dtype=torch.float32).reshape(())
        mn_table = self._max_norm_table(max_norms, device) if p_bound is not None else addrs
        use_sr = sr_seed is not None and dtype == torch.bfloat16
        seed = sr_seed.to(device=device, dtype=torch.int64).reshape(()) if use_sr else addrs
        fi = found_inf.to(device=device, dtype=torch.float32).reshape(()) if found_inf is not None else lr
        gs = grad_scale.to(device=device, dtype=torch.float32).reshape(()) if grad_scale is not None else lr
        with _on(device):
            _launch(apply_k.apply_kernel, (chunks,), layout, addrs, mn_table, stats, lr, fi, gs, seed,
                    float(p_bound) if p_bound is not None else 0.0, n, DTYPE=_triton_dtype(dtype),
                    BLOCK=cfg.block, CHUNK=cfg.chunk, HAS_BOUND=p_bound is not None, MAXIMIZE=bool(maximize),
                    PREFACTOR=bool(prefactor), HAS_FOUND_INF=found_inf is not None,
                    HAS_GRAD_SCALE=grad_scale is not None, SR=use_sr, num_warps=cfg.num_warps,
                    **apply_k.LAUNCH_OPTIONS)
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)


BACKEND = TritonBackend()
