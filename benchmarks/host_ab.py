"""Host work of two checkouts, side by side: the host-overhead preset run alternately from each.

    python benchmarks/host_ab.py --a /path/to/checkout-a --b /path/to/checkout-b [--rounds 5]
        [--python-a venv-a/bin/python --python-b venv-b/bin/python] [--presets resnet50,few-huge]

Each round runs ``python -m fromage_fused.bench --presets host-overhead --threads 1`` once from
each checkout (A then B, then B then A in the next round, so that drift on a shared machine falls
on both) for the same contenders, and the table gives, per contender, the median over rounds of
each checkout's median step in microseconds per tensor and the ratio B / A, with the spread of the
rounds' own ratios (the quartiles of B / A over rounds, and of A / A between consecutive rounds: how
far two runs of the same code land apart here, the noise a difference must exceed). Every run builds or
loads its checkout's own C++ extension (the build is keyed by the sources). A checkout whose
Triton kernels differ needs an interpreter of its own (a virtual environment with the checkout
installed editable): ``fromage_fused.kernels`` comes from the install, not from PYTHONPATH.
``--presets`` compares other presets the same way (their time per tensor is the step's time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONTENDERS = "fromage:cpu,bound:cpu,stub:triton,fromage:foreach"


def run(python: str, checkout: Path, presets: str, contenders: str, repeats: int, out: Path, name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [python, "-m", "fromage_fused.bench", "--device", "cpu", "--presets", presets,
           "--contenders", contenders, "--threads", "1", "--repeats", str(repeats), "--out", str(out),
           "--name", name, "--no-plot", "--no-progress"]
    subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads((out / f"{name}.json").read_text())["rows"]
    several = "," in presets
    return {f"{r['preset']} {r['contender']}" if several else r["contender"]: r["us_per_tensor"]
            for r in rows if r.get("status") == "ok"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, type=Path, help="checkout A (the baseline)")
    ap.add_argument("--b", required=True, type=Path, help="checkout B")
    ap.add_argument("--python-a", default=sys.executable, help="the interpreter for checkout A")
    ap.add_argument("--python-b", default=sys.executable, help="the interpreter for checkout B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--contenders", default=CONTENDERS)
    ap.add_argument("--presets", default="host-overhead")
    args = ap.parse_args(argv)
    samples = {"A": {}, "B": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            a, b = ("A", args.python_a, args.a), ("B", args.python_b, args.b)
            for label, python, checkout in ([a, b] if k % 2 == 0 else [b, a]):
                got = run(python, checkout.resolve(), args.presets, args.contenders, args.repeats, Path(tmp),
                          f"{label}{k}")
                for contender, us in got.items():
                    samples[label].setdefault(contender, []).append(us)
            print(f"round {k + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{'contender':<30} {'A us/tensor':>12} {'B us/tensor':>12} {'B/A':>7} {'B/A q1-q3':>13} {'A/A q1-q3':>13}"
          f"   (medians of {args.rounds} rounds)")
    for contender in samples["A"]:
        a_runs, b_runs = samples["A"][contender], samples["B"].get(contender, [])
        a, b = statistics.median(a_runs), statistics.median(b_runs) if b_runs else float("nan")
        ratios = [y / x for x, y in zip(a_runs, b_runs)]
        same = [y / x for x, y in zip(a_runs, a_runs[1:])]
        print(f"{contender:<30} {a:12.3f} {b:12.3f} {b / a:7.3f} {_quartiles(ratios):>13} {_quartiles(same):>13}")


def _quartiles(values) -> str:
    if len(values) < 2:
        return "-"
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}-{q[2]:.3f}"


if __name__ == "__main__":
    main()
