"""Figure 4 in spirit: final loss over a grid of learning rates for SGD, Adam and Fromage.

MLPs of depth 3 and 8 (width 64, no batch norm) on scikit-learn's digits, each optimizer run over
the same log grid of learning rates from 1e-4 to 1. Plots the final training loss against the
learning rate, and reports which learning rate was best for each optimizer at each depth and the
range of learning rates that fit the training set (final training loss below 0.01).

    python examples/lr_sensitivity.py [--quick] [--out DIR]
"""
from __future__ import annotations

import json
import math
import os
import sys

import matplotlib.pyplot as plt

from _common import COLORS, OPTIMIZERS, Clock, digits, evaluate, log_grid, mlp, out_dir, parse_args, train, write_summary


FIT = 0.01  # a final training loss below this fits the training set


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    path = out_dir(args, "lr_sensitivity")
    depths = [3] if args.quick else [3, 8]
    width, steps = (16, 20) if args.quick else (64, 600)
    lrs = log_grid(1e-3, 1e-1, 3) if args.quick else log_grid(1e-4, 1.0, 9)
    x, y, xt, yt = digits(args.seed)
    clock = Clock()
    results = {}  # (depth, name) -> list of (lr, train loss, test accuracy)
    for depth in depths:
        for name, make in OPTIMIZERS.items():
            rows = []
            for lr in lrs:
                net = mlp(depth, width, seed=args.seed, init=args.init)
                train(net, make(net.parameters(), lr), x, y, steps=steps, seed=args.seed)
                loss, _ = evaluate(net, x, y)
                rows.append((lr, loss, evaluate(net, xt, yt)[1]))
                print(f"depth {depth} {name:7s} lr {lr:.3g}: train loss {loss:.3g} test acc {rows[-1][2]:.3f} [{clock}]", flush=True)
            results[(depth, name)] = rows

    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4), squeeze=False)
    for col, depth in enumerate(depths):
        ax = axes[0][col]
        for name in OPTIMIZERS:
            rows = results[(depth, name)]
            # a diverged run is drawn at the top of the axis, as a cross
            ax.plot([r[0] for r in rows], [min(r[1], 10.0) for r in rows], "o-", color=COLORS[name], label=name)
            bad = [r[0] for r in rows if not math.isfinite(r[1])]
            ax.plot(bad, [10.0] * len(bad), "x", color=COLORS[name], ms=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"final training loss ({steps} steps)")
        ax.set_title(f"MLP depth {depth}")
        ax.legend()
    fig.suptitle("Learning-rate sensitivity on digits (x: diverged)")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "lr_sensitivity.png"), dpi=90)
    plt.close(fig)

    lines = [f"lr sensitivity: width {width}, {steps} steps of batch 128, lr grid {lrs[0]:g}..{lrs[-1]:g} ({len(lrs)} points)"]
    for (depth, name), rows in results.items():
        best = min(rows, key=lambda r: r[1])
        good = [r[0] for r in rows if r[1] < FIT]
        span = f"[{min(good):.3g}, {max(good):.3g}]" if good else "none"
        lines.append(
            f"depth {depth} {name:7s}: best lr {best[0]:.3g} (train loss {best[1]:.3g}, test acc {best[2]:.3f}); "
            f"train loss < {FIT:g} for lr in {span} ({len(good)}/{len(rows)} grid points)"
        )
    lines.append(f"wall time {clock}")
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump([{"depth": d, "optimizer": n, "lr": r[0], "train_loss": r[1] if math.isfinite(r[1]) else None, "test_acc": r[2]} for (d, n), rows in results.items() for r in rows], f, indent=1)
    write_summary(path, lines, args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
