"""Figure 2 on digits: without Fromage's 1/sqrt(1+lr^2) prefactor, weight norms compound until they overflow.

The paper's claim: in a scale-invariant layer the gradient is orthogonal to the weights, so each
LARS step (Fromage without the prefactor, ``Fromage(..., prefactor=False)``; the authors' LARS
baseline, no weight decay or momentum) multiplies the weight norm by sqrt(1 + lr^2); the growth
compounds and ends in numerical overflow, while Fromage keeps the norms fixed. The authors showed
it in a spectrally normalised class-conditional GAN on CIFAR-10; here the scale-invariant network
is an MLP whose every linear layer (no biases) is followed by a BatchNorm without affine
parameters. Such a network computes the same function at any scale of its weights, so LARS and
Fromage follow the same trajectory of functions and have the same loss until LARS overflows: equal
losses are expected, not a finding. BatchNorm always uses the statistics of the batch at hand
(no running statistics), so the loss of the whole training set is measured with full-batch
statistics.

Each finished run is appended to ``runs.jsonl`` with its provenance and reused by a later call;
``--report-only`` rebuilds the plot and the summary from the records.

    python examples/prefactor.py [--quick] [--out DIR] [--steps N] [--fresh] [--report-only]
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import matplotlib.pyplot as plt
import torch

from _common import (COLORS, Runs, add_provenance_args, batches, digits, finite_or_none, linear_weights, make_optimizer,
                     out_dir, parser, save_figure, write_summary)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (dtype, lr) of the full run; LARS and Fromage each
RUNS = [("float32", 0.01), ("float32", 0.1), ("bfloat16", 0.1), ("float16", 0.1)]
QUICK_RUNS = [("float32", 0.1), ("float16", 1.0)]
DEPTH, WIDTH, BATCH = 4, 64, 128
CHANCE_LOSS = math.log(10)  # the loss of a constant output: what a net whose BatchNorm overflowed computes


def scale_invariant_mlp(seed: int, dtype: torch.dtype) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    sizes = [64] + [WIDTH] * (DEPTH - 1) + [10]
    layers = []
    for i in range(DEPTH):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1], bias=False),
                   torch.nn.BatchNorm1d(sizes[i + 1], affine=False, track_running_stats=False)]
        if i < DEPTH - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(dtype)


def norms(net):
    return [w.detach().double().norm().item() for w in linear_weights(net)]


@torch.no_grad()
def full_batch_loss(net, x, y) -> float:
    out = net(x).float()
    return torch.nn.functional.cross_entropy(out, y).item()


def run(name, lr, dtype, steps, every, x, y, seed):
    net = scale_invariant_mlp(seed, DTYPES[dtype])
    xd = x.to(DTYPES[dtype])
    start = norms(net)
    opt = make_optimizer(name, net.parameters(), lr)
    rec = {"steps": [], "norms": [], "largest": [], "loss": [], "overflow": None, "dead": None, "start": start}
    stream = batches(len(x), BATCH, seed)

    def record(step):
        rec["steps"].append(step)
        now = norms(net)
        rec["norms"].append([n / n0 for n, n0 in zip(now, start)])
        rec["largest"].append(max(now))
        rec["loss"].append(full_batch_loss(net, xd, y))
        if rec["dead"] is None and abs(rec["loss"][-1] - CHANCE_LOSS) < 1e-4:
            rec["dead"] = step

    for step in range(steps):
        if step % every == 0:
            record(step)
        idx = next(stream)
        loss = torch.nn.functional.cross_entropy(net(xd[idx]).float(), y[idx])
        weights_ok = all(torch.isfinite(w).all() for w in linear_weights(net))
        if not (torch.isfinite(loss) and weights_ok):
            rec["overflow"] = step
            record(step)
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    else:
        record(steps)
    return rec


def _jsonable(rec: dict) -> dict:
    """JSON has no inf/NaN: non-finite losses and norms are written as null (read back as inf)."""
    out = dict(rec)
    out["loss"] = [finite_or_none(v) for v in rec["loss"]]
    out["largest"] = [finite_or_none(v) for v in rec["largest"]]
    out["norms"] = [[finite_or_none(v) for v in row] for row in rec["norms"]]
    return out


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--seed", type=int, default=0)
    add_provenance_args(p)
    args = p.parse_args(argv)
    runs, every = RUNS, 50
    if args.quick:
        runs, args.steps, every = QUICK_RUNS, 60, 5
    path = out_dir(args, "prefactor-quick" if args.quick else "prefactor")
    records = Runs(path, "prefactor.py", argv, fresh=args.fresh, report_only=args.report_only, shard=args.shard)
    x, y, _, _ = digits(args.seed)
    results = {}  # (name, lr, dtype) -> record
    for dtype, lr in runs:
        for name in ("LARS", "Fromage"):
            settings = {"optimizer": name, "lr": lr, "dtype": dtype, "steps": args.steps, "every": every,
                        "seed": args.seed}
            rec = records.get(settings, lambda: _jsonable(run(name, lr, dtype, args.steps, every, x, y, args.seed)))
            if rec is None:
                continue
            rec = rec["result"]
            rec = {k: ([math.inf if v is None else v for v in rec[k]] if k in ("loss", "largest") else rec[k])
                   for k in rec}
            results[(name, lr, dtype)] = rec
            end = ("overflow (inf/NaN) at step %d" % rec["overflow"] if rec["overflow"] is not None
                   else f"finite after {args.steps} steps")
            print(f"{name:7s} lr {lr:g} {dtype:8s}: {end}; max norm ratio "
                  f"{max(rec['norms'][-2 if rec['overflow'] is not None else -1]):.3g}", flush=True)

    if args.shard:
        records.finish_shard(args.shard)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {("float32", 0.01): ":", ("float32", 0.1): "-", ("bfloat16", 0.1): "-.", ("float16", 0.1): "--",
              ("float16", 1.0): "--"}
    for (name, lr, dtype), rec in results.items():
        ls = styles.get((dtype, lr), "-")
        label = f"{name} lr {lr:g} {dtype}"
        top = [v if math.isfinite(v) else math.nan for v in rec["largest"]]
        axes[0].plot(rec["steps"], top, ls, color=COLORS[name], label=label)
        loss = [v if math.isfinite(v) else math.nan for v in rec["loss"]]
        axes[1].plot(rec["steps"], loss, ls, color=COLORS[name], label=label, alpha=0.8)
        if rec["overflow"] is not None:
            finite = [v for v in top if math.isfinite(v)]
            axes[0].plot([rec["overflow"]], [finite[-1]], "x", color=COLORS[name], ms=10, mew=2)
            axes[1].plot([rec["overflow"]], [CHANCE_LOSS * 1.1], "x", color=COLORS[name], ms=10, mew=2)
        if rec["dead"] is not None:
            axes[0].plot([rec["dead"]], [rec["largest"][rec["steps"].index(rec["dead"])]], "o", mfc="none",
                         color=COLORS[name], ms=10, mew=1.5)
    axes[0].axhline(math.sqrt(torch.finfo(torch.float32).max), color="k", lw=0.6)
    axes[0].text(0, math.sqrt(torch.finfo(torch.float32).max) * 3, "1.8e19: squares overflow float32 / bfloat16",
                 fontsize=7)
    axes[0].axhline(torch.finfo(torch.float16).max, color="k", lw=0.6)
    axes[0].text(0, torch.finfo(torch.float16).max * 3, "65504: float16 max", fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("largest ||W_l|| (o: output constant, x: inf/NaN)")
    axes[0].set_title("weight norms")
    axes[0].legend(fontsize=7)
    axes[1].axhline(CHANCE_LOSS, color="gray", lw=0.6, ls=":")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss, full-batch BatchNorm statistics")
    axes[1].set_title("loss (dotted: ln 10, a constant output; x: inf/NaN)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Scale-invariant MLP (depth {DEPTH}, BatchNorm after every layer) on digits: LARS (no prefactor) vs "
                 "Fromage")
    fig.tight_layout()
    save_figure(fig, os.path.join(path, "prefactor.png"))
    plt.close(fig)

    lines = [
        "Prefactor study (paper Figure 2) on scikit-learn's digits.",
        "protocol (here | the authors'):",
        f"  network: MLP depth {DEPTH}, width {WIDTH}, no biases, BatchNorm(affine=False, batch statistics) after "
        "every linear layer | spectrally normalised class-conditional GAN on CIFAR-10",
        f"  training: batch {BATCH}, constant lr, up to {args.steps} steps, stopped at the first inf/NaN | their GAN "
        "schedule",
        "  as the authors: LARS = Fromage without the prefactor, no weight decay or momentum",
        "  loss measured on the whole training set in one batch (full-batch statistics), every %d steps" % every,
        "results:",
    ]
    def broken(rec):
        """The first step at which the run had stopped computing: output constant, or inf/NaN."""
        events = [e for e in (rec["dead"], rec["overflow"]) if e is not None]
        return min(events) if events else None

    for (name, lr, dtype), rec in results.items():
        last = len(rec["steps"]) - (2 if rec["overflow"] is not None and len(rec["steps"]) > 1 else 1)
        n, t = rec["norms"][last], rec["steps"][last]
        events = []
        if rec["dead"] is not None:
            events.append(f"output constant (loss ln 10) from step {rec['dead']}")
        if rec["overflow"] is not None:
            events.append(f"inf/NaN at step {rec['overflow']}")
        end = "; ".join(events) if events else f"finite and training for all {args.steps} steps"
        lines.append(f"  {name:7s} lr {lr:<4g} {dtype:8s}: {end}; largest ||W|| {rec['largest'][last]:.3g} at step "
                     f"{t}, ||W|| / start {min(n):.4g}..{max(n):.4g} (LARS theory (1+lr^2)^(t/2) = "
                     f"{(1 + lr * lr) ** (t / 2):.4g}); full-batch loss there {rec['loss'][last]:.4g}")
    for dtype, lr in runs:
        # The two compute the same function up to BatchNorm's eps, so their losses agree until
        # LARS's arithmetic gives way; "departs": the first record where LARS's loss is 1.5x Fromage's.
        lars, fro = results[("LARS", lr, dtype)], results[("Fromage", lr, dtype)]
        rows = list(zip(lars["steps"], lars["loss"], fro["loss"], lars["largest"]))
        depart = next(((st, big) for st, a, b, big in rows if not (math.isfinite(a) and a <= 1.5 * b)), None)
        before = [abs(a - b) / b for st, a, b, _ in rows if depart is None or st < depart[0]]
        where = f"departs at step {depart[0]} (largest ||W|| {depart[1]:.3g})" if depart else "never departs"
        lines.append(f"  lr {lr:g} {dtype}: LARS's loss {where}; {'before that ' if depart else ''}its relative "
                     f"difference from Fromage's is {statistics.median(before):.2g} (median), {max(before):.2g} (max)")
    lars_big = {k: broken(r) for k, r in results.items() if k[0] == "LARS" and k[1] >= 0.1}
    fromage_ok = all(broken(r) is None and max(r["norms"][-1]) < 10
                     for (n, _, _), r in results.items() if n == "Fromage")
    if lars_big and all(v is not None for v in lars_big.values()) and fromage_ok:
        verdict = ("the paper's claim holds: LARS's norms grow by sqrt(1+lr^2) per step until the arithmetic "
                   "overflows (" + ", ".join(f"{k[2]} at lr {k[1]:g}: step {v}" for k, v in lars_big.items())
                   + "), while Fromage's stay within a factor 10 of their start and it keeps training")
    else:
        verdict = "not shown by this run: " + ("a LARS run at lr >= 0.1 kept computing"
                                               if not all(v is not None for v in lars_big.values())
                                               else "a Fromage run broke down or its norms grew tenfold")
    lines.append(f"verdict: {verdict}.")
    lines += records.provenance()
    write_summary(path, lines)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
