"""Timing one step: CUDA events on a GPU, ``torch.utils.benchmark`` on CPU.

Each sample is one step, preceded by an untimed ``prepare()`` (switch to the next parameter set,
swap in fresh gradient storage). On a GPU the device is idle when a sample starts, so the time
includes the host work of the step (planning, dispatch, launches): what a training loop pays.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import torch
import torch.utils.benchmark as tbench

from . import traffic

Fn = Callable[[], None]


@dataclass
class Timing:
    times: List[float]  # seconds, one per step

    @property
    def median(self) -> float:
        return percentile(self.times, 50)

    @property
    def q1(self) -> float:
        return percentile(self.times, 25)

    @property
    def q3(self) -> float:
        return percentile(self.times, 75)

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median: on an idle machine a step's samples
        stay within a few tenths of it (at most 0.48 in the recorded CPU runs); other processes
        competing for the cores spread them far wider."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else math.inf


def percentile(values: List[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a step's data could stay in between samples (L2 on a GPU)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    best = 32 * 2**20
    for level in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = level.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (ValueError, IndexError):
            continue
        best = max(best, size)
    return best


def parameter_sets(footprint: int, cache: int, *, limit: int = 32) -> int:
    """How many copies of the data to rotate through so that no step finds its data in cache:
    one when the data is four times the cache or more, else enough to cover four caches (>= 2)."""
    if footprint >= 4 * cache:
        return 1
    return max(2, min(limit, math.ceil(4 * cache / max(footprint, 1))))


def repeats_within(budget_s: float, step_s: float, repeats: int, minimum: int = 3) -> int:
    """Fewer repeats for a slow contender so one row stays within ``budget_s`` (never below ``minimum``)."""
    if step_s <= 0:
        return repeats
    return max(minimum, min(repeats, int(budget_s / step_s)))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step: Fn, prepare: Fn, device: torch.device, count: int, first: int = 1) -> float:
    """Run ``first`` first steps (one per parameter set: state, plans, compilation), then ``count``
    more; return the wall time of the slowest of those ``count`` (seconds; of all, if none)."""
    slowest = slowest_first = 0.0
    for i in range(max(first, 1) + count):
        prepare()
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        took = time.perf_counter() - start
        if i < max(first, 1):
            slowest_first = max(slowest_first, took)
        else:
            slowest = max(slowest, took)
    return slowest if count > 0 else slowest_first


def time_cuda(step: Fn, prepare: Fn, device: torch.device, repeats: int) -> Timing:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        prepare()
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return Timing(times)


def time_cpu(step: Fn, prepare: Fn, repeats: int) -> Timing:
    timer = tbench.Timer(stmt="step()", setup="prepare()", globals={"step": step, "prepare": prepare},
                         num_threads=torch.get_num_threads())
    # timeit(1) runs `prepare()` untimed, then one timed step.
    return Timing([timer.timeit(1).times[0] for _ in range(repeats)])


def time_step(step: Fn, prepare: Fn, device: torch.device, *, warmup: int, repeats: int, budget_s: float,
              first: int = 1) -> Timing:
    """``first`` untimed first steps (one per parameter set), ``warmup`` untimed steps, then
    ``repeats`` timed ones (fewer when a step is slow: ``budget_s`` per row)."""
    slowest = warm_up(step, prepare, device, warmup, first)
    repeats = repeats_within(budget_s, slowest, repeats)
    if device.type == "cuda":
        return time_cuda(step, prepare, device, repeats)
    return time_cpu(step, prepare, repeats)


def copy_bandwidth(device: torch.device, nbytes: int, *, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read and written), median of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_step(lambda: dst.copy_(src), lambda: None, device, warmup=3, repeats=repeats, budget_s=60)
    return traffic.copy_gbps(nbytes // 4 * 4, timing.median)


def default_copy_bytes(device: torch.device) -> int:
    return 2**30 if device.type == "cuda" else 2**27
