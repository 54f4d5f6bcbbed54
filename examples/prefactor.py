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

    python examples/prefactor.py [--quick] [--out DIR] [--steps N]
"""
from __future__ import annotations

import math
import os
import sys

import matplotlib.pyplot as plt
import torch

from _common import COLORS, Clock, batches, command, digits, linear_weights, make_optimizer, out_dir, parser, write_summary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (dtype, lr) of the full run; LARS and Fromage each
RUNS = [("float32", 0.01), ("float32", 0.1), ("bfloat16", 0.1), ("float16", 0.1)]
QUICK_RUNS = [("float32", 0.1), ("float16", 1.0)]
DEPTH, WIDTH, BATCH = 4, 64, 128


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
    rec = {"steps": [], "norms": [], "loss": [], "overflow": None, "start": start}
    stream = batches(len(x), BATCH, seed)

    def record(step):
        rec["steps"].append(step)
        rec["norms"].append([n / n0 for n, n0 in zip(norms(net), start)])
        rec["loss"].append(full_batch_loss(net, xd, y))

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


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    runs, every = RUNS, 50
    if args.quick:
        runs, args.steps, every = QUICK_RUNS, 60, 5
    path = out_dir(args, "prefactor")
    x, y, _, _ = digits(args.seed)
    clock = Clock()
    results = {}  # (name, lr, dtype) -> record
    for dtype, lr in runs:
        for name in ("LARS", "Fromage"):
            rec = run(name, lr, dtype, args.steps, every, x, y, args.seed)
            results[(name, lr, dtype)] = rec
            end = "overflow (inf/NaN) at step %d" % rec["overflow"] if rec["overflow"] is not None else f"finite after {args.steps} steps"
            print(f"{name:7s} lr {lr:g} {dtype:8s}: {end}; max norm ratio {max(rec['norms'][-2 if rec['overflow'] is not None else -1]):.3g} [{clock}]", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {("float32", 0.01): ":", ("float32", 0.1): "-", ("bfloat16", 0.1): "-.", ("float16", 0.1): "--", ("float16", 1.0): "--"}
    for (name, lr, dtype), rec in results.items():
        ls = styles.get((dtype, lr), "-")
        label = f"{name} lr {lr:g} {dtype}"
        top = [max(n) if all(math.isfinite(v) for v in n) else math.nan for n in rec["norms"]]
        axes[0].plot(rec["steps"], top, ls, color=COLORS[name], label=label)
        loss = [v if math.isfinite(v) else math.nan for v in rec["loss"]]
        axes[1].plot(rec["steps"], loss, ls, color=COLORS[name], label=label, alpha=0.8)
        if rec["overflow"] is not None:
            finite = [(s, v) for s, v in zip(rec["steps"], top) if math.isfinite(v)]
            axes[0].plot([rec["overflow"]], [finite[-1][1]], "x", color=COLORS[name], ms=10, mew=2)
            axes[1].axvline(rec["overflow"], color=COLORS[name], ls=ls, lw=0.8)
    s0 = min(min(r["start"]) for r in results.values())
    axes[0].axhline(torch.finfo(torch.float32).max / s0, color="k", lw=0.6)
    axes[0].text(0, torch.finfo(torch.float32).max / s0 * 2, "float32 / bf16 max", fontsize=7)
    axes[0].axhline(torch.finfo(torch.float16).max / s0, color="k", lw=0.6)
    axes[0].text(0, torch.finfo(torch.float16).max / s0 * 2, "float16 max", fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("largest ||W_l|| / ||W_l at start|| (x: overflow)")
    axes[0].set_title("weight norms")
    axes[0].legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss, full-batch BatchNorm statistics")
    axes[1].set_title("loss (vertical line: that run overflowed)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Scale-invariant MLP (depth {DEPTH}, BatchNorm after every layer) on digits: LARS (no prefactor) vs Fromage")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "prefactor.png"), dpi=90)
    plt.close(fig)

    lines = [
        "Prefactor study (paper Figure 2) on scikit-learn's digits.",
        f"command: {command('prefactor.py', argv)}",
        "protocol (here | the authors'):",
        f"  network: MLP depth {DEPTH}, width {WIDTH}, no biases, BatchNorm(affine=False, batch statistics) after every linear layer"
        " | spectrally normalised class-conditional GAN on CIFAR-10",
        f"  training: batch {BATCH}, constant lr, up to {args.steps} steps, stopped at the first inf/NaN | their GAN schedule",
        "  as the authors: LARS = Fromage without the prefactor, no weight decay or momentum",
        "  loss measured on the whole training set in one batch (full-batch statistics), every %d steps" % every,
        "results:",
    ]
    for (name, lr, dtype), rec in results.items():
        n = rec["norms"][-2] if rec["overflow"] is not None and len(rec["norms"]) > 1 else rec["norms"][-1]
        t = rec["steps"][-2] if rec["overflow"] is not None and len(rec["steps"]) > 1 else rec["steps"][-1]
        theory = (1 + lr * lr) ** (t / 2)
        end = f"overflows to inf/NaN at step {rec['overflow']}" if rec["overflow"] is not None else f"finite for all {args.steps} steps"
        finite_loss = [v for v in rec["loss"] if math.isfinite(v)]
        lines.append(f"  {name:7s} lr {lr:<4g} {dtype:8s}: {end}; weight norm / start at step {t}: {min(n):.4g}..{max(n):.4g} "
                     f"(LARS theory (1+lr^2)^(t/2) = {theory:.4g}); last finite full-batch loss {finite_loss[-1]:.4g}")
    for dtype, lr in runs:
        lars, fro = results[("LARS", lr, dtype)], results[("Fromage", lr, dtype)]
        pairs = [(a, b) for s, a, b in zip(lars["steps"], lars["loss"], fro["loss"]) if lars["overflow"] is None or s < lars["overflow"]]
        gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs if math.isfinite(a) and math.isfinite(b))
        lines.append(f"  lr {lr:g} {dtype}: largest relative difference of the LARS and Fromage losses before LARS overflowed: {gap:.2g}")
    overflowed = [k for k, r in results.items() if r["overflow"] is not None]
    bounded = all(r["overflow"] is None and max(r["norms"][-1]) < 1.1 for (n, _, _), r in results.items() if n == "Fromage")
    lars_big = [k for k in overflowed if k[0] == "LARS" and k[1] >= 0.1]
    if lars_big and bounded and not any(k[0] == "Fromage" for k in overflowed):
        verdict = ("the paper's claim holds: LARS's norms grow by sqrt(1+lr^2) per step until they overflow ("
                   + ", ".join(f"{k[2]} at lr {k[1]:g}: step {results[k]['overflow']}" for k in lars_big)
                   + "), while Fromage's stay within 10% of their start and its loss stays finite")
    else:
        verdict = "not shown by this run: " + ("no LARS run overflowed" if not lars_big else "a Fromage run overflowed or its norms drifted")
    lines.append(f"verdict: {verdict}.")
    lines.append(f"wall time {clock} on {torch.get_num_threads()} CPU thread(s){', --quick' if args.quick else ''}; seed {args.seed}")
    write_summary(path, lines)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
