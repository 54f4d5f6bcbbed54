"""Time one optimizer step per (parameter preset x contender) and compare them.

    python -m fromage_fused.bench [--quick] [--device cuda] [--presets a,b] [--contenders 'fromage:*,loop']
                                  [--dtype bfloat16] [--repeats N] [--out DIR] [--from-json FILE]

Writes DIR/NAME.json, NAME.csv and NAME.png and prints a table at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional

import torch

from . import contenders as _contenders
from . import presets as _presets
from . import measure, report
from .runner import Config, run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

#: What --quick means per device type (documented in benchmarks/NOTES.md).
QUICK = {
    "cpu": dict(repeats=10, warmup=2, budget_s=4.0, compile_presets=()),
    "cuda": dict(repeats=25, warmup=5, budget_s=5.0, compile_presets=("gpt2-small",)),
}
FULL = {
    "cpu": dict(repeats=20, warmup=3, budget_s=15.0, compile_presets=None),
    "cuda": dict(repeats=100, warmup=10, budget_s=20.0, compile_presets=None),
}

_copy_bytes = measure.default_copy_bytes


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fromage-bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:i] (default: cuda if present)")
    p.add_argument("--presets", help=f"comma-separated, from {list(_presets.PRESETS)} (default: all; --quick: a subset "
                                     "on CPU)")
    p.add_argument("--contenders", help="comma-separated names or patterns, e.g. 'fromage:*,loop' (default: all; see "
                                        "--list)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--repeats", type=int, help="timed steps per row (default: 20 CPU, 100 GPU; --quick: 10 / 25)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 3 CPU, 10 GPU)")
    p.add_argument("--budget", type=float, help="seconds per row at most: a slow contender gets fewer repeats (>= 3)")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="directory for NAME.json/.csv/.png (default: bench-out)")
    p.add_argument("--name", help="file stem of the results (default: bench-DEVICE[-quick])")
    p.add_argument("--quick", action="store_true",
                   help="a short run: CPU subset in about a minute; on a GPU every preset, fewer repeats")
    p.add_argument("--sets", type=int, help="parameter sets to rotate through (default: enough that no step finds its "
                                            "data in cache)")
    p.add_argument("--fresh-grads", action="store_true",
                   help="new gradient storage before every step (backends that cache tensor tables rebuild them)")
    p.add_argument("--misalign", default="0,0", metavar="P,G",
                   help="parameters and gradients as views starting P and G elements into their buffers (default 0,0: "
                        "aligned)")
    p.add_argument("--p-bound", type=float, default=None, help="run Fromage with this p_bound (default: none)")
    p.add_argument("--max-spread", type=float, default=0.5,
                   help="a row whose samples' interquartile range exceeds this fraction of their median is reported as "
                        "noisy, not as a result (default 0.5)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); recorded in every row")
    p.add_argument("--compile-presets", help="presets on which torch.compile runs (default: all; --quick: none on CPU, "
                                             "gpt2-small on GPU)")
    p.add_argument("--compile-max-tensors", type=int, default=400,
                   help="skip torch.compile on presets with more tensors")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="list the presets and contenders here and exit")
    p.add_argument("--from-json", type=Path, help="print the table (and redraw the plot beside it) from a results "
                                                  "file, run nothing")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    needed = ([] if args.from_json or args.list else ["tqdm"]) + ([] if args.no_plot or args.list else ["matplotlib"])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        print(f"fromage-bench: needs {' and '.join(missing)}: pip install {' '.join(missing)} "
              "(what the [bench] extra installs)", file=sys.stderr)
        return 2
    if args.from_json:
        rows, meta = report.load_json(args.from_json)
        if not args.no_plot and rows:
            from .plot import plot

            plot(rows, args.from_json.with_suffix(".png"))
        print(report.format_table(rows, meta))
        warning = report.noise_warning(rows)
        if warning:
            print(f"\nfromage-bench: warning: {warning}", file=sys.stderr)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fromage-bench: --device cuda but CUDA is not available here", file=sys.stderr)
        return 2
    if device.type not in QUICK:
        print(f"fromage-bench: device type {device.type!r} is not supported (cpu or cuda)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = (QUICK if args.quick else FULL)[device.type]
    settings = _contenders.Settings(p_bound=args.p_bound, compile_max_tensors=args.compile_max_tensors,
                                    compile_presets=_csv(args.compile_presets) or mode["compile_presets"])
    if args.list:
        for p in _presets.PRESETS.values():
            print(f"preset     {p.name:<14} {p.about}")
        for c in _contenders.all_contenders(device, settings, list(_presets.PRESETS)):
            print(f"contender  {c.name:<18} {c.about} (work {c.work} B/param, traffic {c.traffic} B/param at fp32)")
        return 0
    names = _csv(args.presets) or (_presets.QUICK[device.type] if args.quick else list(_presets.PRESETS))
    try:
        misalign = tuple(int(x) for x in args.misalign.split(","))
        if len(misalign) != 2 or min(misalign) < 0:
            raise ValueError(f"--misalign takes two element offsets P,G >= 0, got {args.misalign!r}")
        chosen = _presets.select(names)
        _contenders.select(_contenders.all_contenders(device, settings, names), _csv(args.contenders))
    except ValueError as exc:
        print(f"fromage-bench: {exc}", file=sys.stderr)
        return 2
    cfg = Config(
        device=device, presets=chosen, contender_patterns=_csv(args.contenders), dtype=DTYPES[args.dtype],
        repeats=args.repeats or mode["repeats"], warmup=args.warmup if args.warmup is not None else mode["warmup"],
        budget_s=args.budget or mode["budget_s"], fresh_grads=args.fresh_grads, misalign=misalign, sets=args.sets,
        copy_bytes=_copy_bytes(device), settings=settings, out=args.out,
        name=args.name or f"bench-{device.type}{'-quick' if args.quick else ''}", plot=not args.no_plot,
        progress=not args.no_progress, max_spread=args.max_spread,
    )
    rows, meta = run(cfg, log=lambda msg: print(msg, file=sys.stderr))
    print(report.format_table(rows, meta))
    warning = report.noise_warning(rows)
    if warning:
        print(f"\nfromage-bench: warning: {warning}", file=sys.stderr)
    if cfg.out is not None:
        print(f"\nwrote {cfg.out / cfg.name}.json, .csv{'' if args.no_plot else ', .png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
