"""Figure 4 at toy scale: does Fromage's best learning rate stay put across tasks and architectures?

The paper's claim: tuned on different benchmarks (a CIFAR-10 ResNet, a class-conditional GAN, a
Transformer language model), Fromage's best learning rate is the same, 0.01, while the best
learning rates of SGD and Adam move from task to task. Here four small tasks with different
architectures, each swept over the same grid (1e-4 to 3.16, half decades, constant lr) with SGD,
Adam and Fromage on seed 0, then on seeds 1 and 2 at each optimizer's best lr (the authors' own
seed protocol), scored as the paper scores them, on training metrics:

- ``mlp``: the authors' depth-study MLP (3 hidden layers of width 64, biases, default init) on
  digits, 300 steps of batch 250; metric: mean minibatch training loss over the last pass;
- ``resnet``: Table 1's pre-activation ResNet on digits (random 1-pixel shifts), 25 epochs of batch
  128; the same metric; Fromage with ``p_bound=1.0`` (the paper's CIFAR-10 setting) and without;
- ``transformer``: Table 1's character-level Transformer, 7 epochs; metric: training perplexity;
- ``gan``: an MLP GAN on a ring of 8 Gaussians in 2-D, 600 steps, one optimizer and lr for both
  nets; metric: squared MMD between 1000 generated and 1000 true points (the paper's FID is
  likewise a distance between generated and true samples).

The authors' baselines: SGD without momentum (their CIFAR-10, GAN and Transformer scripts; clipped
at gradient norm 0.25 on the Transformer, as theirs), Adam with torch's defaults and beta1 = 0 on
the GAN. A run whose loss becomes inf/NaN counts as diverged and cannot be best. A task's best lr is
the one with the lowest seed-0 metric; an optimizer's spread is the distance in decades between its
smallest and largest best lr over the tasks, given with and without the GAN (the task where SGD's
best lr sits furthest from the others).

Each finished run is appended to ``runs.jsonl`` with its provenance and reused by a later call;
``--report-only`` rebuilds the plot and the summary from the records.

    python examples/lr_transfer.py [--quick] [--out DIR] [--seeds N] [--fresh] [--report-only]
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import matplotlib.pyplot as plt
import torch

from _common import (OPTIMIZER_NAMES, Runs, add_provenance_args, authors_mlp, batches, digits, finite_or_none, log_grid,
                     make_optimizer, out_dir, parser, save_figure, write_summary)
from table1 import run_resnet, run_transformer

GRID = log_grid(1e-4, 3.16, 10)
CE = torch.nn.functional.cross_entropy
NO_DECAY = 10 ** 6
TASKS = {
    "mlp": {"metric": "training loss", "optimizers": OPTIMIZER_NAMES,
            "full": {"steps": 300}, "quick": {"steps": 12}},
    "resnet": {"metric": "training loss", "optimizers": OPTIMIZER_NAMES + ["Fromage, no p_bound"],
               "full": {"channels": 16, "batch": 128, "epochs": 25, "decay_epochs": [NO_DECAY, NO_DECAY]},
               "quick": {"channels": 8, "batch": 128, "epochs": 1, "decay_epochs": [NO_DECAY, NO_DECAY]}},
    "transformer": {"metric": "training perplexity", "optimizers": OPTIMIZER_NAMES,
                    "full": {"d": 64, "layers": 2, "heads": 2, "context": 32, "streams": 32, "epochs": 7,
                             "decay_epoch": NO_DECAY, "chars": None},
                    "quick": {"d": 16, "layers": 1, "heads": 2, "context": 16, "streams": 8, "epochs": 1,
                              "decay_epoch": NO_DECAY, "chars": 2000}},
    "gan": {"metric": "MMD^2 to the data", "optimizers": OPTIMIZER_NAMES, "full": {"steps": 600},
            "quick": {"steps": 12}},
}


def run_mlp(opt_name, lr, seed, cfg, p_bound=None) -> dict:
    x, y, _, _ = digits(0)
    net = authors_mlp(3, 64, seed=seed)
    opt = make_optimizer(opt_name, net.parameters(), lr)
    stream = batches(len(x), 250, seed)
    per_pass = math.ceil(len(x) / 250)
    losses = []
    for _ in range(cfg["steps"]):
        idx = next(stream)
        loss = CE(net(x[idx]), y[idx])
        if not torch.isfinite(loss):
            return {"metric": None}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"metric": torch.stack(losses[-per_pass:]).mean().item()}


def ring(n, gen):
    centres = torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1) * 2.0
    return centres[torch.randint(8, (n,), generator=gen)] + 0.05 * torch.randn(n, 2, generator=gen)


def mmd2(a, b, scales=(0.05, 0.2, 1.0)):
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (biased estimate, >= 0)."""
    def k(u, v):
        d2 = torch.cdist(u, v).square()
        return sum(torch.exp(-d2 / (2 * s * s)) for s in scales)
    return (k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()).item()


def run_gan(opt_name, lr, seed, cfg, p_bound=None) -> dict:
    data = torch.Generator().manual_seed(99)
    real_eval, noise_eval = ring(1000, data), torch.randn(1000, 2, generator=data)
    torch.manual_seed(seed)

    def mlp(out):
        return torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, out))

    G, D = mlp(2), mlp(1)
    beta1 = 0.0 if opt_name == "Adam" else 0.9
    opt_g, opt_d = (make_optimizer(opt_name, G.parameters(), lr, beta1=beta1),
                    make_optimizer(opt_name, D.parameters(), lr, beta1=beta1))
    gen = torch.Generator().manual_seed(seed)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    batch = 128
    ones, zeros = torch.ones(batch, 1), torch.zeros(batch, 1)
    for _ in range(cfg["steps"]):
        real, z = ring(batch, gen), torch.randn(batch, 2, generator=gen)
        d_loss = bce(D(real), ones) + bce(D(G(z).detach()), zeros)
        if not torch.isfinite(d_loss):
            return {"metric": None}
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = bce(D(G(z)), ones)  # the non-saturating generator loss
        if not torch.isfinite(g_loss):
            return {"metric": None}
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    with torch.no_grad():
        fake = G(noise_eval)
    return {"metric": finite_or_none(mmd2(fake, real_eval)) if torch.isfinite(fake).all() else None}


RUNNERS = {"mlp": run_mlp, "resnet": run_resnet, "transformer": run_transformer, "gan": run_gan}
STYLE = {"SGD": ("tab:blue", "o-"), "Adam": ("tab:orange", "o-"), "Fromage": ("tab:green", "o-"),
         "Fromage, no p_bound": ("tab:green", "s--")}


def values(recs) -> list:
    return [math.inf if r["result"]["metric"] is None else r["result"]["metric"] for r in recs]


def mean(vals) -> float:
    return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else math.inf


def best_lr(by_lr) -> float:
    """The lr with the lowest metric on seed 0 (ties: the smaller); a diverged run scores +inf."""
    return min(by_lr, key=lambda lr: (values(by_lr[lr][:1])[0], lr))


def spread(lrs, grid) -> float:
    """Decades between the smallest and largest lr, counted in grid steps (the grid's rounded
    values would make equal spreads differ in the fourth digit)."""
    steps = [grid.index(lr) for lr in lrs]
    return (max(steps) - min(steps)) * math.log10(grid[-1] / grid[0]) / (len(grid) - 1)


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS), help="a subset of " + ",".join(TASKS))
    add_provenance_args(p)
    args = p.parse_args(argv)
    if any(t not in TASKS for t in args.tasks):
        p.error(f"--tasks: choose from {list(TASKS)}")
    grid = GRID
    mode = "quick" if args.quick else "full"
    if args.quick:
        grid, args.seeds = [1e-3, 1e-2, 1e-1], 2
    path = out_dir(args, "lr_transfer-quick" if args.quick else "lr_transfer")
    runs = Runs(path, "lr_transfer.py", argv, fresh=args.fresh, report_only=args.report_only, shard=args.shard)
    results = {}  # (task, optimizer row) -> lr -> [record per seed]
    for task, spec in TASKS.items():
        if task not in args.tasks:
            continue
        for row in spec["optimizers"]:
            opt_name = row.split(",")[0]
            p_bound = 1.0 if (task == "resnet" and row == "Fromage") else None

            def get(lr, seed):
                settings = {"task": task, "optimizer": opt_name, "lr": lr, "p_bound": p_bound, "seed": seed,
                            "config": spec[mode]}
                rec = runs.get(settings, lambda: RUNNERS[task](opt_name, lr, seed, spec[mode], p_bound))
                if rec is None:
                    return
                results.setdefault((task, row), {}).setdefault(lr, []).append(rec)
                m = rec["result"]["metric"]
                print(f"{task:11s} {row:19s} lr {lr:<7g} seed {seed}: {spec['metric']} "
                      f"{'diverged' if m is None else f'{m:.4g}'}", flush=True)

            for lr in grid:
                get(lr, 0)
            if len(results.get((task, row), {})) < len(grid):
                runs.waiting = True  # a shard's call before the other shards have finished this grid
                continue
            lr = best_lr(results[(task, row)])
            for seed in range(1, args.seeds):
                get(lr, seed)
    if args.shard:
        runs.finish_shard(args.shard)
    best = {key: best_lr(by_lr) for key, by_lr in results.items()}
    plot(path, args, results, best)
    lines = report(args, results, best, grid, runs)
    write_summary(path, lines)
    return results


def plot(path, args, results, best) -> None:
    tasks = {t: s for t, s in TASKS.items() if t in args.tasks}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 4.9), squeeze=False)
    for ax, (task, spec) in zip(axes[0], tasks.items()):
        finite = [v for row in spec["optimizers"] for recs in results[(task, row)].values() for v in values(recs)
                  if math.isfinite(v)]
        top = max(finite) * 2 if finite else 1.0
        for k, row in enumerate(spec["optimizers"]):
            color, fmt = STYLE[row]
            by_lr = results[(task, row)]
            shift = 1.0 + 0.06 * (k - 1)  # side by side, so that error bars do not hide each other
            seed0 = [(lr, values(r[:1])[0]) for lr, r in sorted(by_lr.items())]
            ok = [(lr, v) for lr, v in seed0 if math.isfinite(v)]
            ax.plot([lr * shift for lr, _ in ok], [v for _, v in ok], fmt, ms=4, color=color, label=f"{row}, seed 0")
            bad = [lr * shift for lr, v in seed0 if not math.isfinite(v)]
            ax.plot(bad, [top] * len(bad), "x", color=color, ms=8, mew=2)
            b = best[(task, row)]
            v = values(by_lr[b])
            if math.isfinite(mean(v)):
                m = mean(v)
                ax.errorbar([b * shift], [m], yerr=[[m - min(v)], [max(v) - m]], fmt="*", ms=15, mec="k", capsize=4,
                            color=color)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.axvline(0.01, color="gray", ls=":", lw=1)
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"{spec['metric']} (lower is better)")
        ax.set_title(task)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    fig.suptitle("Learning-rate sweeps on training metrics (seed 0); star: the best lr, mean and min-max of "
                 f"{args.seeds} seed(s) there; x at the top: diverged; dotted: lr 0.01"
                 + (" (--quick)" if args.quick else ""))
    fig.tight_layout()
    save_figure(fig, os.path.join(path, "lr_transfer.png"))
    plt.close(fig)


def report(args, results, best, grid, runs) -> list:
    mode = "quick" if args.quick else "full"
    tasks = {t: s for t, s in TASKS.items() if t in args.tasks}
    lines = [
        "Learning-rate transfer (paper Figure 4) at toy scale.",
        "protocol (here | the authors'):",
        "  tasks: authors' MLP on digits; Table 1's pre-activation ResNet on digits; Table 1's char-level Transformer; "
        "MLP GAN on a 2-D ring of 8 Gaussians | CIFAR-10 PreActResNet-18, class-conditional GAN on CIFAR-10, "
        "Transformer on Wikitext-2",
        "  training: " + ", ".join(f"{t} {s[mode]}" for t, s in tasks.items())
        + "; constant lr | full runs, lr / 10 at set epochs",
        "  metrics: " + ", ".join(f"{t} {s['metric']}" for t, s in tasks.items())
        + " | CIFAR-10 training loss, FID, training perplexity",
        f"  lr grid {grid[0]:g}..{grid[-1]:g} ({len(grid)} points) on seed 0, seeds 1..{args.seeds - 1} at the best lr "
        "of seed 0 | a grid per task, more seeds at the best lr",
        "  SGD without momentum (clipped at 0.25 on the Transformer), Adam (beta1 = 0 on the GAN), Fromage with "
        "p_bound 1.0 on the ResNet (also without) | the same",
        "results: best lr of seed 0 (mean [min, max] over the seeds at it):",
    ]
    for task, spec in tasks.items():
        for row in spec["optimizers"]:
            b = best[(task, row)]
            v = values(results[(task, row)][b])
            shown = f"{mean(v):.4g} [{min(v):.4g}, {max(v):.4g}]" if math.isfinite(mean(v)) else "every lr diverged"
            lines.append(f"  {task:11s} {row:19s}: best lr {b:<7g} {spec['metric']} {shown}")
    names = list(tasks)
    rows = [(n, [best[(t, n)] for t in names]) for n in OPTIMIZER_NAMES]
    rows.append(("Fromage, no p_bound",
                 [best[(t, "Fromage, no p_bound" if t == "resnet" else "Fromage")] for t in names]))
    if "gan" not in names:
        lines.append(f"tasks run: {', '.join(names)} (not all four: the spreads and verdicts below cover these only)")
    lines.append("best lr by task:        " + "".join(f"{t:>12s}" for t in names)
                 + "   spread (decades): all tasks | without the GAN")
    spreads = {}
    for name, lrs in rows:
        no_gan = [lr for t, lr in zip(names, lrs) if t != "gan"]
        spreads[name] = (spread(lrs, grid), spread(no_gan, grid))
        lines.append(f"  {name:20s} " + "".join(f"{lr:>12g}" for lr in lrs)
                     + f"   {spreads[name][0]:.1f} | {spreads[name][1]:.1f}")
    fromage = sorted(set(rows[2][1]))
    for k, label in ((0, "all tasks run"), (1, "without the GAN")):
        f, s, a = spreads["Fromage"][k], spreads["SGD"][k], spreads["Adam"][k]
        if fromage == [0.01] and k == 0 and f < min(s, a):
            v = "the paper's claim holds: Fromage's best lr is 0.01 on every task, and SGD's and Adam's move more"
        elif f < min(s, a):
            v = f"in part: Fromage's best lr moves least ({f:.1f} decades; SGD {s:.1f}, Adam {a:.1f})"
        elif f <= max(s, a):
            v = (f"in part: Fromage's best lr moves {f:.1f} decades, no less than one of SGD ({s:.1f}) and Adam "
                 f"({a:.1f})")
        else:
            v = (f"not reproduced: Fromage's best lr moves more ({f:.1f} decades) than SGD's ({s:.1f}) and Adam's "
                 f"({a:.1f})")
        lines.append(f"verdict, {label} (Fromage as the paper ran it, p_bound on the ResNet): {v}.")
    lines += runs.provenance()
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
