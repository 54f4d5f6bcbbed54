"""Time some of the benchmark's contenders in turn, one step each per round, on a shared machine.

The benchmark (``python -m fromage_fused.bench``) times all the steps of one contender before
the next: when other jobs come and go, one contender gets a quiet minute and another a busy one.
Here every round runs one step of each contender (in an order that rotates), so a load that
changes over minutes slows them all alike and their ratios stay meaningful; the medians are of
the rounds. Same presets, contenders, parameter sets and rotation as the benchmark.

    python benchmarks/interleaved.py --presets resnet50,gpt2-small --contenders 'timm:*,torch:adamw' \
        --rounds 21 --baseline torch:adamw --out benchmarks/results/interleaved.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fromage_fused.bench import contenders as C
from fromage_fused.bench import measure, presets, report
from fromage_fused.bench.runner import Config, _Data


def run(preset_names, patterns, rounds, warmup, sets=None, show=lambda rows: None):
    device = torch.device("cpu")
    chosen = presets.select(preset_names)
    settings = C.Settings()
    contenders = C.select(C.all_contenders(device, settings, preset_names), patterns)
    cfg = Config(device=device, presets=chosen)
    cache = measure.cache_bytes(device)
    rows = []
    for preset in chosen:
        shapes = preset.shapes(device)
        n = presets.numel(shapes)
        count = sets or measure.parameter_sets(n * 4 * 2, cache)
        data = _Data(shapes, count, cfg)
        steps, notes = {}, {}
        for c in contenders:
            ctx = C.Context(preset.name, settings)
            try:
                steps[c.name] = [c.build(params, ctx) for params in data.params]
            except C.Skip as why:
                notes[c.name] = str(why)
                continue
            for _ in range(count + warmup):  # every set's first step (state) and the warm-up, untimed
                steps[c.name][data.prepare()]()
            notes[c.name] = "; ".join(ctx.notes)
        times = {name: [] for name in steps}
        names = list(steps)
        for r in range(rounds):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                turn = data.prepare()
                start = time.perf_counter()
                steps[name][turn]()
                times[name].append(time.perf_counter() - start)
        for c in contenders:
            t = times.get(c.name)
            row = dict(preset=preset.name, n_params=n, n_tensors=len(shapes), param_sets=count, contender=c.name,
                       work_bytes_per_param=c.work, note=notes.get(c.name, ""))
            if t:
                row.update(rounds=len(t), median_ms=measure.percentile(t, 50) * 1e3,
                           q1_ms=measure.percentile(t, 25) * 1e3, q3_ms=measure.percentile(t, 75) * 1e3,
                           us_per_tensor=measure.percentile(t, 50) * 1e6 / len(shapes))
            rows.append(row)
        show(rows[-len(contenders):])
        del data, steps
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", required=True)
    p.add_argument("--contenders", required=True, help="names or patterns, comma-separated")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sets", type=int, help="parameter sets (default: as the benchmark, enough to defeat the cache)")
    p.add_argument("--threads", type=int)
    p.add_argument("--baseline", help="a contender: each row's median over it")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = report.environment(torch.device("cpu"))
    env["load_before"] = os.getloadavg()
    print(f"{env['device_name']}, torch {env['torch']}, {env['threads']} threads, load {env['load_before'][0]:.1f}",
          flush=True)

    def show(preset_rows):
        base = [r.get("median_ms") for r in preset_rows if r["contender"] == args.baseline]
        for r in preset_rows:
            if base and base[0] and r.get("median_ms"):
                r[f"over_{args.baseline}"] = r["median_ms"] / base[0]
            ratio = r.get(f"over_{args.baseline}")
            timing = (f"{r['median_ms']:9.2f} ms  [{r['q1_ms']:.2f}, {r['q3_ms']:.2f}]" if "median_ms" in r
                      else f"skipped: {r['note']}")
            print(f"{r['preset']:<14} {r['contender']:<14} {timing}" + (f"  x{ratio:.2f}" if ratio else ""), flush=True)

    rows = run(args.presets.split(","), args.contenders.split(","), args.rounds, args.warmup, args.sets, show)
    env["load_after"] = os.getloadavg()
    print(f"load after {env['load_after'][0]:.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=env, rows=rows), indent=1))


if __name__ == "__main__":
    main()
