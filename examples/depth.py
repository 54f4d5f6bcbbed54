"""Figure 3 at small scale: how deep a plain MLP (no batch norm, no skips) each optimizer can train.

MLPs of width 64 and depth 2 to 32 on scikit-learn's digits, trained with SGD, Adam and Fromage,
each at a small grid of learning rates; plots the final training accuracy (best over the grid, and
every grid point) against depth.

    python examples/depth.py [--quick] [--out DIR]
"""
from __future__ import annotations

import json
import os
import sys

import matplotlib.pyplot as plt

from _common import COLORS, OPTIMIZERS, Clock, digits, evaluate, mlp, out_dir, parse_args, train, write_summary

LRS = {"SGD": [0.01, 0.1, 1.0], "Adam": [1e-4, 1e-3, 1e-2], "Fromage": [1e-3, 1e-2, 1e-1]}


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    path = out_dir(args, "depth")
    depths = [2, 8] if args.quick else [2, 4, 8, 16, 24, 32]
    steps, width = (20, 16) if args.quick else (1000, 64)
    lrs = {k: v[1:2] for k, v in LRS.items()} if args.quick else LRS
    x, y, _, _ = digits(args.seed)
    clock = Clock()
    results = {name: {} for name in OPTIMIZERS}  # name -> depth -> lr -> train accuracy
    for depth in depths:
        for name, make in OPTIMIZERS.items():
            for lr in lrs[name]:
                net = mlp(depth, width, seed=args.seed, init=args.init)
                train(net, make(net.parameters(), lr), x, y, steps=steps, seed=args.seed)
                loss, acc = evaluate(net, x, y)
                results[name].setdefault(depth, {})[lr] = acc
                print(f"depth {depth:2d} {name:7s} lr {lr:g}: train loss {loss:.3g} acc {acc:.3f}  [{clock}]", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, by_depth in results.items():
        best = [max(by_depth[d].values()) for d in depths]
        axes[0].plot(depths, best, "o-", color=COLORS[name], label=name)
        for lr in lrs[name]:
            axes[1].plot(depths, [by_depth[d][lr] for d in depths], ".-", color=COLORS[name], alpha=0.3 + 0.7 * lrs[name].index(lr) / max(len(lrs[name]) - 1, 1),
                         label=f"{name} lr={lr:g}")
    for ax, title in zip(axes, ["best over the lr grid", "every lr (darker = larger)"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth (linear layers)")
        ax.set_ylabel("final training accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(title)
    axes[0].legend()
    axes[1].legend(fontsize=6, ncol=3)
    fig.suptitle(f"MLPs without batch norm or skips on digits, {steps} steps of batch 128")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "depth.png"), dpi=90)
    plt.close(fig)

    lines = [f"depth experiment: width {width}, {steps} steps, batch 128, digits train set ({len(x)} images)"]
    lines.append("best final training accuracy over the lr grid:")
    lines.append("depth " + " ".join(f"{name:>8s}" for name in results))
    for d in depths:
        lines.append(f"{d:5d} " + " ".join(f"{max(results[n][d].values()):8.3f}" for n in results))
    lines.append(f"lr grids: {json.dumps(lrs)}; wall time {clock}")
    write_summary(path, lines, args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
