"""Figure 2 at small scale: why Fromage divides by sqrt(1 + lr^2).

A scale-invariant MLP (every linear layer followed by a BatchNorm without affine parameters) on
scikit-learn's digits, trained with the paper's LARS baseline (Fromage without the prefactor,
``Fromage(..., prefactor=False)``) and with Fromage, at a few learning rates. The gradient of a
scale-invariant layer is orthogonal to its weights, so each LARS step multiplies the weight norm
by sqrt(1 + lr^2): it compounds. Plots each layer's weight norm over the steps, and the loss.

    python examples/prefactor.py [--quick] [--out DIR]
"""
from __future__ import annotations

import os
import sys

import matplotlib.pyplot as plt
import torch

from fromage_fused import Fromage
from _common import COLORS, Clock, digits, evaluate, mlp, out_dir, parse_args, train, weights, write_summary


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    path = out_dir(args, "prefactor")
    depth, width = (3, 16) if args.quick else (4, 64)
    steps, every = (20, 5) if args.quick else (3000, 25)
    lrs = [0.1] if args.quick else [0.01, 0.03, 0.1]
    x, y, _, _ = digits(args.seed)
    clock = Clock()
    results = {}  # (name, lr) -> {"steps", "norms" (per layer, relative to start), "loss"}
    for lr in lrs:
        for name, prefactor in (("LARS", False), ("Fromage", True)):
            net = mlp(depth, width, batchnorm=True, seed=args.seed, init=args.init)
            start = [w.detach().norm().item() for w in weights(net)]
            rec = {"steps": [], "norms": [], "loss": []}

            def hook(step, net):
                rec["steps"].append(step)
                rec["norms"].append([w.detach().norm().item() / n0 for w, n0 in zip(weights(net), start)])
                net.eval()
                rec["loss"].append(evaluate(net, x, y)[0])
                net.train()

            train(net, Fromage(net.parameters(), lr=lr, prefactor=prefactor), x, y, steps=steps, seed=args.seed, every=every, hook=hook)
            results[(name, lr)] = rec
            print(f"{name:7s} lr {lr:g}: final norm ratios {[round(v, 3) for v in rec['norms'][-1]]}, loss {rec['loss'][-1]:.3g} [{clock}]", flush=True)

    fig, axes = plt.subplots(2, len(lrs), figsize=(4.5 * len(lrs), 7), squeeze=False)
    for col, lr in enumerate(lrs):
        for name in ("LARS", "Fromage"):
            rec = results[(name, lr)]
            for layer in range(depth):
                axes[0][col].plot(rec["steps"], [n[layer] for n in rec["norms"]], color=COLORS[name], alpha=0.4 + 0.6 * layer / max(depth - 1, 1),
                                  label=name if layer == 0 else None)
            axes[1][col].plot(rec["steps"], rec["loss"], color=COLORS[name], label=name)
        s = results[("LARS", lr)]["steps"]
        axes[0][col].plot(s, [(1 + lr * lr) ** (t / 2) for t in s], "k--", lw=1, label="(1+lr^2)^(t/2)")
        axes[0][col].set_yscale("log")
        axes[0][col].set_title(f"lr {lr:g}: ||W_l|| / ||W_l at start||")
        axes[1][col].set_yscale("log")
        axes[1][col].set_title(f"lr {lr:g}: training loss (eval mode)")
        for row in axes:
            row[col].set_xlabel("step")
            row[col].legend(fontsize=7)
    fig.suptitle(f"Scale-invariant MLP (BatchNorm, depth {depth}) on digits: LARS (no prefactor) vs Fromage")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "prefactor.png"), dpi=90)
    plt.close(fig)

    lines = [f"prefactor: depth {depth}, width {width}, BatchNorm(affine=False) after every layer, {steps} steps of batch 128"]
    for (name, lr), rec in results.items():
        norms = rec["norms"][-1]
        lines.append(
            f"{name:7s} lr {lr:<5g}: weight norm / initial after {steps} steps: min {min(norms):.4g} max {max(norms):.4g} "
            f"(LARS theory (1+lr^2)^(T/2) = {(1 + lr * lr) ** (steps / 2):.4g}); final loss {rec['loss'][-1]:.4g}, best {min(rec['loss']):.4g}"
        )
    lines.append(f"wall time {clock}")
    write_summary(path, lines, args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
