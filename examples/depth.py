"""Figure 3 on digits: how deep a plain MLP can be and still train, with SGD, Adam and Fromage.

The authors' protocol (their MNIST depth notebook), kept except for the data and the scale: N
hidden ``Linear -> ReLU`` layers with biases and a final ``Linear`` (depth = N, the hidden layers),
PyTorch's default initialisation, no batch norm or skips; SGD with momentum 0.9; batch 250; lr
x0.95 every 240 steps (one of their epochs); score = mean minibatch training accuracy over the last
240 steps. Here: scikit-learn's digits (1437 training images of 64 pixels) instead of MNIST, width
128 instead of 784, and 2,000 steps (4,000 from depth 25 on) instead of their 24,000.

Learning rates: SGD 1, 0.1, 0.01 (theirs); Adam 1e-2 ... 1e-5 (theirs and one more decade, so
that its best is not at the grid's edge); Fromage 0.1, 0.0316, 0.01, 0.00316, 0.001 (theirs and
the half decades between, for the best lr against depth). Seeds, as the authors' own scripts do
it: every lr on seed 0, then seeds 1 and 2 at each optimizer's best lr of seed 0; the score of an
optimizer at a depth is the mean over the three seeds there.

Fixed before the full run: an optimizer *trains* a depth if its score there is at least 0.9;
the claim (Fromage trains deeper nets than SGD and Adam) holds if the deepest depth Fromage
trains is deeper than the deepest either of the others trains. Scores of at least 0.2 (twice
chance) are reported too, as *learns*. The right panel's claim (deeper nets need a smaller lr,
as the descent lemma's ``max_safe_lr`` says) holds if Fromage's best lr at the deepest depth is
below its best lr at the shallowest; ``max_safe_lr`` is shown with L counted both ways (weight
matrices, N + 1; every tensor that moves, weights and biases, 2(N + 1)).

Ablations, labelled in their output folder's name: ``--init he`` (He-normal weights, zero
biases) and ``--no-bias``. Each finished run is appended to ``runs.jsonl`` in the output folder
with its provenance and reused by a later call, so an interrupted study resumes.

    python examples/depth.py [--quick] [--out DIR] [--init he] [--no-bias] [--steps N] [--long-steps N]
                             [--fresh] [--report-only]
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import matplotlib.pyplot as plt
import torch

from fromage_fused import max_safe_lr
from _common import (AUTHORS_EPOCH, COLORS, OPTIMIZER_NAMES, Runs, add_provenance_args, authors_mlp, batches,
                     decay_every, digits, make_optimizer, out_dir, parser, save_figure, write_summary)

LRS = {"SGD": [1.0, 0.1, 0.01], "Adam": [1e-2, 1e-3, 1e-4, 1e-5], "Fromage": [0.1, 0.0316, 0.01, 0.00316, 0.001]}
DEPTHS = [2, 5, 10, 20, 30, 50]
AUTHORS_STEPS = 100 * AUTHORS_EPOCH
BATCH = 250
CHANCE = 0.1
TRAINS, LEARNS = 0.9, 2 * CHANCE


def run(hidden: int, name: str, lr: float, seed: int, steps: int, args, x, y) -> dict:
    """Mean minibatch accuracy over the last epoch and per epoch; score None if the loss diverged."""
    net = authors_mlp(hidden, args.width, bias=not args.no_bias, init=args.init, seed=seed)
    opt = make_optimizer(name, net.parameters(), lr, momentum=0.9)
    stream = batches(len(x), BATCH, seed)
    accs = []
    for step in range(steps):
        if step and step % AUTHORS_EPOCH == 0:
            decay_every(opt, 0.95)
        idx = next(stream)
        out = net(x[idx])
        loss = torch.nn.functional.cross_entropy(out, y[idx])
        if not torch.isfinite(loss):
            return {"score": None, "curve": [], "diverged_at": step}
        accs.append((out.argmax(1) == y[idx]).float().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    accs = torch.stack(accs).tolist()
    epoch = min(AUTHORS_EPOCH, len(accs))
    curve = [sum(accs[i:i + epoch]) / len(accs[i:i + epoch]) for i in range(0, len(accs), epoch)]
    return {"score": sum(accs[-epoch:]) / epoch, "curve": curve}


def name_of(args) -> str:
    return "depth" + ("-he-init" if args.init == "he" else "") + ("-no-bias" if args.no_bias else "")


def score(rec) -> float:
    """A diverged run scores chance."""
    s = rec["result"]["score"]
    return CHANCE if s is None else s


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--init", choices=["default", "he"], default="default",
                   help="default: PyTorch's (the authors'); he: ablation")
    p.add_argument("--no-bias", action="store_true", help="ablation: linear layers without biases")
    p.add_argument("--steps", type=int, default=2000, help="steps below depth --long-from")
    p.add_argument("--long-steps", type=int, default=4000, help="steps from depth --long-from on")
    p.add_argument("--long-from", type=int, default=25)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depths", type=lambda s: [int(v) for v in s.split(",")], default=DEPTHS)
    p.add_argument("--seeds", type=int, default=3)
    add_provenance_args(p)
    args = p.parse_args(argv)
    lrs = LRS
    if args.quick:
        args.steps, args.long_steps, args.long_from, args.width, args.depths, args.seeds = 30, 60, 6, 16, [2, 6], 2
        lrs = {"SGD": [0.1], "Adam": [1e-3], "Fromage": [0.01, 0.001]}
    path = out_dir(args, name_of(args) + ("-quick" if args.quick else ""))
    runs = Runs(path, "depth.py", argv, fresh=args.fresh, report_only=args.report_only, shard=args.shard)
    x, y, _, _ = digits(0)

    def steps_at(d):
        return args.long_steps if d >= args.long_from else args.steps

    def get(depth, name, lr, seed):
        settings = {"depth": depth, "optimizer": name, "lr": lr, "seed": seed, "steps": steps_at(depth),
                    "width": args.width, "init": args.init, "bias": not args.no_bias}
        rec = runs.get(settings, lambda: run(depth, name, lr, seed, steps_at(depth), args, x, y))
        if rec is None:
            return None
        s = rec["result"]["score"]
        print(f"depth {depth:2d} {name:7s} lr {lr:<7g} seed {seed}: last-epoch train acc "
              f"{'diverged' if s is None else f'{s:.3f}'}  [{rec['seconds']:.0f} s]", flush=True)
        return rec

    # Depth by depth (so that a study cut short has whole depths): every lr on seed 0, then the
    # other seeds at each optimizer's best lr of seed 0 (ties: the larger lr, as max() of (score, lr) gives).
    grid = {n: {} for n in OPTIMIZER_NAMES}
    best_lr = {n: {} for n in OPTIMIZER_NAMES}
    seeds = {n: {} for n in OPTIMIZER_NAMES}
    for d in args.depths:
        for n in OPTIMIZER_NAMES:
            grid[n][d] = {lr: get(d, n, lr, 0) for lr in lrs[n]}
        if any(r is None for n in OPTIMIZER_NAMES for r in grid[n][d].values()):
            runs.waiting = True  # a shard's call before the other shards have finished this depth's grid
            continue
        for n in OPTIMIZER_NAMES:
            best_lr[n][d] = max((score(r), lr) for lr, r in grid[n][d].items())[1]
            seeds[n][d] = [grid[n][d][best_lr[n][d]]] + [get(d, n, best_lr[n][d], s) for s in range(1, args.seeds)]
    if args.shard:
        runs.finish_shard(args.shard)
    best = {n: {d: [score(r) for r in seeds[n][d]] for d in args.depths} for n in OPTIMIZER_NAMES}

    plot(path, args, lrs, grid, best_lr, seeds, best)
    lines = report(args, lrs, grid, best_lr, best, runs)
    write_summary(path, lines)
    return {n: {d: statistics.fmean(v) for d, v in by_d.items()} for n, by_d in best.items()}


def depth_l(depth: int):
    """L of an MLP with ``depth`` hidden layers: weight matrices, and every tensor that moves (with biases)."""
    return depth + 1, 2 * (depth + 1)


def deepest(best, name, level):
    ok = [d for d, v in best[name].items() if statistics.fmean(v) >= level]
    return max(ok) if ok else None


def report(args, lrs, grid, best_lr, best, runs) -> list:
    depths = args.depths
    steps = (f"{args.steps} (depth < {args.long_from}) and {args.long_steps} (depth >= {args.long_from})"
             if any(d >= args.long_from for d in depths) else f"{args.steps}")
    lines = [
        "Depth study (paper Figure 3) on scikit-learn's digits.",
        "protocol (here | the authors'):",
        "  data:   digits, 1437 training images of 64 pixels | MNIST, 60,000 images of 784",
        f"  width:  {args.width} | 784",
        f"  steps:  {steps} of batch {BATCH} | {AUTHORS_STEPS}, 100 epochs of 240 steps",
        f"  init:   {'PyTorch default' if args.init == 'default' else 'He-normal, zero biases (ablation)'} | PyTorch "
        "default",
        f"  biases: {'no (ablation)' if args.no_bias else 'yes'} | yes",
        "  as the authors: hidden Linear+ReLU layers and a final Linear, no batch norm or skips, depth = hidden "
        "layers;",
        "  SGD with momentum 0.9, Adam, Fromage; lr x0.95 every 240 steps; score = mean minibatch train accuracy over "
        "the last",
        f"  240 steps (a diverged run scores chance, 0.1); every lr on seed 0, then seeds 1..{args.seeds - 1} at each "
        "optimizer's best lr",
        f"lr grids: {json.dumps(lrs)}",
        f"score at each optimizer's best lr, mean [min, max] over {args.seeds} seeds (best lr of seed 0):",
        "depth " + "".join(f"{n:>33s}" for n in OPTIMIZER_NAMES),
    ]
    for d in depths:
        cells = []
        for n in OPTIMIZER_NAMES:
            v = best[n][d]
            cells.append(f"{statistics.fmean(v):.3f} [{min(v):.3f}, {max(v):.3f}] ({best_lr[n][d]:g})")
        lines.append(f"{d:5d} " + "".join(f"{c:>33s}" for c in cells))
    lines.append("seed 0 at every lr (diverged: -):")
    for n in OPTIMIZER_NAMES:
        for d in depths:
            cells = ", ".join(f"{lr:g}: " + ("-" if r["result"]["score"] is None else f"{r['result']['score']:.3f}")
                              for lr, r in grid[n][d].items())
            lines.append(f"  {n:7s} depth {d:2d}: {cells}")
    reach = {n: deepest(best, n, TRAINS) for n in OPTIMIZER_NAMES}
    learn = {n: deepest(best, n, LEARNS) for n in OPTIMIZER_NAMES}
    lines.append(f"deepest depth trained (score >= {TRAINS:g}): "
                 + ", ".join(f"{n} {reach[n]}" for n in OPTIMIZER_NAMES))
    lines.append(f"deepest depth learnt (score >= {LEARNS:g}, twice chance): "
                 + ", ".join(f"{n} {learn[n]}" for n in OPTIMIZER_NAMES))
    f_reach, other = reach["Fromage"] or 0, max(reach["SGD"] or 0, reach["Adam"] or 0)
    if f_reach > other:
        verdict = (f"the paper's claim holds here: Fromage trains deeper nets (to depth {f_reach}) than SGD "
                   f"({reach['SGD']}) and Adam ({reach['Adam']})")
    elif f_reach == other:
        verdict = "not shown here: Fromage trains no deeper than the best of SGD and Adam"
    else:
        verdict = "contradicted here: SGD or Adam trains deeper than Fromage"
    lines.append(f"verdict (depth): {verdict}, at this scale.")
    largest = {d: max((lr for lr, r in grid["Fromage"][d].items() if score(r) >= TRAINS), default=None) for d in depths}
    lines.append(f"Fromage's largest lr that trains on seed 0 (score >= {TRAINS:g}), by depth (reported, not part of a "
                 "rule): "
                 + ", ".join(f"depth {d}: {'none' if largest[d] is None else f'{largest[d]:g}'}" for d in depths))
    lines.append("Fromage's best lr (seed 0) against the descent lemma's max_safe_lr(L), L = weight matrices | every "
                 "moved tensor:")
    for d in depths:
        lw, la = depth_l(d)
        b = best_lr["Fromage"][d]
        lines.append(f"  depth {d:2d}: best lr {b:<7g} max_safe_lr {max_safe_lr(lw):.4f} (L={lw}) | "
                     f"{max_safe_lr(la):.4f} (L={la}); best lr {'<=' if b <= max_safe_lr(lw) else '>'} the first, "
                     f"{'<=' if b <= max_safe_lr(la) else '>'} the second")
    shallow, deep = best_lr["Fromage"][depths[0]], best_lr["Fromage"][depths[-1]]
    if deep < shallow:
        v2 = f"holds: Fromage's best lr falls from {shallow:g} at depth {depths[0]} to {deep:g} at depth {depths[-1]}"
    else:
        v2 = f"not shown: Fromage's best lr is {shallow:g} at depth {depths[0]} and {deep:g} at depth {depths[-1]}"
    lines.append(f"verdict (deeper nets need a smaller lr): {v2}, at this scale.")
    lines += runs.provenance()
    return lines


def plot(path, args, lrs, grid, best_lr, seeds, best) -> None:
    depths = args.depths
    fig, axes = plt.subplots(2, 3, figsize=(16, 11))
    ax = axes[0][0]
    for n in OPTIMIZER_NAMES:
        m = [statistics.fmean(best[n][d]) for d in depths]
        lo = [mi - min(best[n][d]) for mi, d in zip(m, depths)]
        hi = [max(best[n][d]) - mi for mi, d in zip(m, depths)]
        ax.errorbar(depths, m, yerr=[lo, hi], fmt="o-", capsize=3, color=COLORS[n], label=n)
    ax.axhline(TRAINS, color="k", lw=0.8, ls="--", label=f"trains: {TRAINS:g}")
    ax.axhline(CHANCE, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_title(f"best lr of each optimizer: mean, min-max of {args.seeds} seeds")
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("last-epoch minibatch train accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)

    ax = axes[0][1]
    every = list(range(1, max(depths) + 1))
    ax.plot(every, [max_safe_lr(depth_l(d)[0]) for d in every], "k-", lw=1,
            label="max_safe_lr(L), L = weight matrices (N+1)")
    ax.plot(every, [max_safe_lr(depth_l(d)[1]) for d in every], "k--", lw=1,
            label="max_safe_lr(L), L = all moved tensors (2N+2)")
    ax.plot(depths, [best_lr["Fromage"][d] for d in depths], "D", ms=9, color=COLORS["Fromage"],
            label="Fromage's best lr (seed 0)")
    for lr in lrs["Fromage"]:
        ax.axhline(lr, color=COLORS["Fromage"], lw=0.4, alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("depth N (hidden layers)")
    ax.set_ylabel("learning rate (thin lines: Fromage's grid)")
    ax.set_title("Fromage's best lr against the descent lemma's bound")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)

    ax = axes[0][2]
    deepest_d = depths[-1]
    for n in OPTIMIZER_NAMES:
        for k, r in enumerate(seeds[n][deepest_d]):
            curve = r["result"]["curve"]
            total = r["steps"]
            ax.plot([min(AUTHORS_EPOCH * (i + 1), total) for i in range(len(curve))], curve, "o-", ms=2,
                    color=COLORS[n], alpha=0.8, label=f"{n} lr {best_lr[n][deepest_d]:g}, seeds" if k == 0 else None)
    ax.axhline(CHANCE, color="gray", lw=0.8, ls=":")
    ax.set_title(f"depth {deepest_d}: training curves at each optimizer's best lr")
    ax.set_xlabel("step")
    ax.set_ylabel(f"mean minibatch train accuracy per {AUTHORS_EPOCH} steps")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)

    for ax, n in zip(axes[1], OPTIMIZER_NAMES):
        cmap = plt.get_cmap("viridis")
        for k, lr in enumerate(lrs[n]):
            recs = [grid[n][d][lr] for d in depths]
            color = cmap(k / max(len(lrs[n]) - 1, 1))
            ax.plot(depths, [score(r) for r in recs], "o-", color=color, label=f"lr {lr:g}")
            bad = [d for d, r in zip(depths, recs) if r["result"]["score"] is None]
            ax.plot(bad, [CHANCE] * len(bad), "x", color=color, ms=10, mew=2)
        ax.axhline(CHANCE, color="gray", lw=0.8, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("depth (hidden layers)")
        ax.set_ylabel("last-epoch minibatch train accuracy (seed 0)")
        ax.set_title(f"{n}: every lr (x: diverged, scored as chance)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=5, frameon=False)
    label = ({"default": "PyTorch default init", "he": "He init (ablation)"}[args.init]
             + (", no biases (ablation)" if args.no_bias else ", biases"))
    longer = f" ({args.long_steps} from depth {args.long_from})" if any(d >= args.long_from for d in depths) else ""
    fig.suptitle(f"Plain MLPs on digits, width {args.width}, {label}; {args.steps} steps of batch {BATCH}{longer}"
                 + (" (--quick)" if args.quick else ""))
    fig.tight_layout()
    save_figure(fig, os.path.join(path, "depth.png"))
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
