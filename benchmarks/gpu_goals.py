"""The GPU goals of the fused backends, read from one benchmark results file (stdlib only).

    python benchmarks/gpu_goals.py RESULTS.json

Prints one line per goal: PASS, MISS (with the numbers), or ABSENT (a row it needs is missing or
was skipped). The goals compare contenders measured side by side in the same run (fp32):

- ``fromage:cuda`` at >= 90% of the copy bandwidth (20 B/param) on gpt2-small and larger presets;
- ``fromage:cuda`` at <= 0.75x the time of torch's fused AdamW on the same presets;
- ``fromage:cuda`` >= 10x the per-tensor loop on gpt2-small, >= 50x on many-small;
- ``fromage:triton`` within 15% of ``fromage:cuda`` on every preset.
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Tuple

LARGE_FROM = "gpt2-small"  # "gpt2-small and larger": presets with at least its parameter count
COPY_FRACTION = 0.90
ADAMW_RATIO = 0.75
LOOP_SPEEDUP = {"gpt2-small": 10.0, "many-small": 50.0}
TRITON_SLACK = 1.15


def _ok(row: Optional[Dict]) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("median_ms") is not None


def evaluate(rows: List[Dict]) -> List[Tuple[str, str, str]]:
    """``[(verdict, goal, detail)]`` with verdict PASS, MISS or ABSENT."""
    rows = [r for r in rows if r.get("dtype") in (None, "float32")]
    by = {(r["preset"], r["contender"]): r for r in rows}
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    sizes = {r["preset"]: r.get("n_params") or 0 for r in rows}
    out = []

    def row(preset, contender):
        found = by.get((preset, contender))
        return found if _ok(found) else None

    if LARGE_FROM not in sizes:
        large = []
        out.append(("ABSENT", f"presets of at least {LARGE_FROM}'s size", f"no {LARGE_FROM} rows"))
    else:
        large = [p for p in presets if sizes[p] >= sizes[LARGE_FROM]]
    for p in large:
        cuda, adamw = row(p, "fromage:cuda"), row(p, "torch:adamw")
        goal = f"cuda >= {COPY_FRACTION:.2f} x copy bandwidth on {p}"
        if cuda is None or cuda.get("frac_copy") is None:
            out.append(("ABSENT", goal, "no fromage:cuda row"))
        else:
            frac = cuda["frac_copy"]
            out.append(("PASS" if frac >= COPY_FRACTION else "MISS", goal,
                        f"{frac:.3f} ({cuda['gbps']:.0f} of {cuda['copy_gbps']:.0f} GB/s, {cuda['median_ms']:.3f} ms)"))
        goal = f"cuda <= {ADAMW_RATIO:.2f} x fused AdamW's time on {p}"
        if cuda is None or adamw is None:
            out.append(("ABSENT", goal, "needs fromage:cuda and torch:adamw rows"))
        else:
            ratio = cuda["median_ms"] / adamw["median_ms"]
            out.append(("PASS" if ratio <= ADAMW_RATIO else "MISS", goal,
                        f"{ratio:.3f} ({cuda['median_ms']:.3f} vs {adamw['median_ms']:.3f} ms)"))
    for p, want in LOOP_SPEEDUP.items():
        cuda, loop = row(p, "fromage:cuda"), row(p, "loop")
        goal = f"cuda >= {want:g}x the per-tensor loop on {p}"
        if cuda is None or loop is None:
            out.append(("ABSENT", goal, "needs fromage:cuda and loop rows"))
        else:
            speedup = loop["median_ms"] / cuda["median_ms"]
            out.append(("PASS" if speedup >= want else "MISS", goal,
                        f"{speedup:.1f}x ({loop['median_ms']:.3f} vs {cuda['median_ms']:.3f} ms)"))
    for p in presets:
        cuda, triton = row(p, "fromage:cuda"), row(p, "fromage:triton")
        goal = f"triton within {TRITON_SLACK - 1:.0%} of cuda on {p}"
        if cuda is None or triton is None:
            out.append(("ABSENT", goal, "needs fromage:cuda and fromage:triton rows"))
        else:
            ratio = triton["median_ms"] / cuda["median_ms"]
            out.append(("PASS" if ratio <= TRITON_SLACK else "MISS", goal,
                        f"{ratio:.3f} ({triton['median_ms']:.3f} vs {cuda['median_ms']:.3f} ms)"))
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    with open(args[0]) as f:
        rows = json.load(f)["rows"]
    results = evaluate(rows)
    for verdict, goal, detail in results:
        print(f"{verdict:6s} {goal}: {detail}")
    counts = {v: sum(1 for r in results if r[0] == v) for v in ("PASS", "MISS", "ABSENT")}
    print(f"goals: {counts['PASS']} pass, {counts['MISS']} miss, {counts['ABSENT']} absent ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
