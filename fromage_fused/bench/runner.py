"""One benchmark run: every (preset x contender) on one device, rows written as they come."""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import contenders as _contenders
from . import measure, report, traffic
from .presets import Preset, make_tensors, numel, offset_view


@dataclass
class Config:
    device: torch.device
    presets: List[Preset]
    contender_patterns: Optional[Sequence[str]] = None
    dtype: torch.dtype = torch.float32
    repeats: int = 20
    warmup: int = 3
    budget_s: float = 10.0
    sets: Optional[int] = None  # parameter sets to rotate through; None: enough to defeat the cache
    fresh_grads: bool = False
    misalign: Tuple[int, int] = (0, 0)  # element offsets of the parameters and the gradients in their buffers
    copy_bytes: int = 2**27
    settings: _contenders.Settings = field(default_factory=_contenders.Settings)
    out: Optional[Path] = None
    name: str = "bench"
    plot: bool = True
    progress: bool = True
    #: A row whose samples' interquartile range exceeds this fraction of their median is "noisy":
    #: kept in the files but not reported as a result (no ratios, not a baseline).
    max_spread: float = 0.5


class _Data:
    """The parameter sets of one preset and the rotation between them."""

    def __init__(self, shapes, sets: int, cfg: Config):
        self.params, self.grads = [], []
        for i in range(sets):
            params, grads = make_tensors(shapes, dtype=cfg.dtype, device=cfg.device, seed=i, misalign=cfg.misalign)
            alternates = [offset_view(g.clone(), cfg.misalign[1]) for g in grads] if cfg.fresh_grads else None
            for p, g in zip(params, grads):
                p.grad = g
            self.params.append(params)
            self.grads.append((grads, alternates))
        self.fresh = cfg.fresh_grads
        self.turn = 0

    def prepare(self) -> int:
        """Move to the next set (untimed); with fresh grads, give it the other gradient storage."""
        self.turn = (self.turn + 1) % len(self.params)
        if self.fresh:
            grads, alternates = self.grads[self.turn]
            use = alternates if self.params[self.turn][0].grad is grads[0] else grads
            for p, g in zip(self.params[self.turn], use):
                p.grad = g
        return self.turn


def _row(env, cfg: Config, preset: Preset, shapes, sets: int, contender, *, note: str, timing=None,
         copy_gbps=None) -> Dict:
    n = numel(shapes)
    work = traffic.scaled(contender.work, cfg.dtype)
    design = traffic.scaled(contender.traffic, cfg.dtype)
    row = dict(env, dtype=str(cfg.dtype).replace("torch.", ""), preset=preset.name, variant=preset.variant(cfg.device),
               n_tensors=len(shapes), n_params=n, param_sets=sets, fresh_grads=cfg.fresh_grads,
               misalign="{},{}".format(*cfg.misalign),
               p_bound=cfg.settings.p_bound, contender=contender.name, status="ok" if timing else "skipped", note=note,
               work_bytes_per_param=work, traffic_bytes_per_param=design, copy_gbps=copy_gbps)
    if timing and timing.spread > cfg.max_spread:
        row["status"] = "noisy"
        row["note"] = "; ".join(filter(None, [note, (
            f"samples too spread to trust (q1-q3 {timing.q1 * 1e3:.3g}-{timing.q3 * 1e3:.3g} ms around a median of "
            f"{timing.median * 1e3:.3g} ms): the machine was busy; rerun when it is idle")]))
    if timing:
        row.update(repeats=len(timing.times), median_ms=timing.median * 1e3, q1_ms=timing.q1 * 1e3,
                   q3_ms=timing.q3 * 1e3, gbps=traffic.gbps(n, work, timing.median),
                   traffic_gbps=traffic.gbps(n, design, timing.median))
        row["frac_copy"] = traffic.fraction(row["gbps"], copy_gbps)
        row["us_per_tensor"] = timing.median * 1e6 / len(shapes)
    return row


def add_ratios(rows: List[Dict]) -> None:
    """Fill each row's ``vs_*`` columns from the baselines' medians in the same preset."""
    medians = {(r["preset"], r["contender"]): r.get("median_ms") for r in rows if r["status"] == "ok"}
    for r in rows:
        for column, baseline in _contenders.BASELINES.items():
            base = medians.get((r["preset"], baseline))
            r[column] = traffic.speedup(base, r.get("median_ms")) if r["status"] == "ok" else None


def _free(device: torch.device) -> None:
    # Reference counting frees host tensors at once; device memory also waits for the allocator.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _save(cfg: Config, rows: List[Dict], meta: Dict) -> None:
    if cfg.out is None:
        return
    cfg.out.mkdir(parents=True, exist_ok=True)
    report.write_json(cfg.out / f"{cfg.name}.json", rows, meta)
    report.write_csv(cfg.out / f"{cfg.name}.csv", rows)


#: A step that does not fit is a result (a skipped row), not the end of the run.
_OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)


def _measure_row(env, cfg: Config, preset: Preset, shapes, sets: int, contender, data: _Data, copy: float, log) -> Dict:
    ctx = _contenders.Context(preset.name, cfg.settings)
    steps = []
    try:
        steps = [contender.build(params, ctx) for params in data.params]
        # Every set's first step (an optimizer's state, Fromage's step plan) happens in the
        # warm-up, before the warm-up proper: otherwise first steps would be timed as samples.
        timing = measure.time_step(lambda: steps[data.turn](), data.prepare, cfg.device,
                                   warmup=cfg.warmup, repeats=cfg.repeats, budget_s=cfg.budget_s, first=len(steps))
        return _row(env, cfg, preset, shapes, sets, contender, note="; ".join(ctx.notes), timing=timing, copy_gbps=copy)
    except _contenders.NotHere:
        return None
    except _contenders.Skip as why:
        note = str(why)
    except _OUT_OF_MEMORY as exc:
        note = f"out of memory: {str(exc).splitlines()[0][:160]}"
    finally:
        steps.clear()  # drop optimizer state before the next contender allocates its own
    log(f"skip {contender.name} on {preset.name}: {note}")
    return _row(env, cfg, preset, shapes, sets, contender, note=note, copy_gbps=copy)


def run(cfg: Config, log=print) -> Tuple[List[Dict], Dict]:
    from tqdm import tqdm

    device = cfg.device
    env = report.environment(device)
    candidates = _contenders.select(_contenders.all_contenders(device, cfg.settings, [p.name for p in cfg.presets]),
                                    cfg.contender_patterns)
    copy = measure.copy_bandwidth(device, cfg.copy_bytes)
    meta = dict(env, copy_gbps=copy, copy_bytes=cfg.copy_bytes, contenders={c.name: c.about for c in candidates},
                presets={p.name: p.about for p in cfg.presets})
    log(f"device {env['device_name']}: copy bandwidth {copy:.1f} GB/s; contenders {[c.name for c in candidates]}")
    cache = measure.cache_bytes(device)
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    rows: List[Dict] = []
    bar = tqdm(total=len(cfg.presets) * len(candidates), disable=not cfg.progress, unit="row", dynamic_ncols=True)
    try:
        for preset in cfg.presets:
            shapes = preset.shapes(device)
            sets = cfg.sets or measure.parameter_sets(numel(shapes) * itemsize * 2, cache)
            try:
                data = _Data(shapes, sets, cfg)
            except _OUT_OF_MEMORY as exc:
                data = None
                _free(device)
                note = f"out of memory for the tensors: {str(exc).splitlines()[0][:160]}"
                log(f"skip {preset.name}: {note}")
            for contender in candidates:
                bar.set_description(f"{preset.name} {contender.name}")
                if data is None:
                    rows.append(_row(env, cfg, preset, shapes, sets, contender, note=note, copy_gbps=copy))
                else:
                    row = _measure_row(env, cfg, preset, shapes, sets, contender, data, copy, log)
                    if row is not None:
                        rows.append(row)
                _free(device)
                add_ratios(rows)
                _save(cfg, rows, meta)
                bar.update()
            del data
            _free(device)
    finally:
        bar.close()
    if cfg.out is not None and cfg.plot and rows:
        from .plot import plot

        plot(rows, cfg.out / f"{cfg.name}.png")
    return rows, meta
