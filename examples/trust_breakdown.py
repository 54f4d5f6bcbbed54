"""Figure 1 at small scale: where a step along the gradient stops being trustworthy, by depth.

MLPs of depth 2 and 16 on scikit-learn's digits, trained with Fromage; at a few checkpoints every
layer is perturbed by ``W - eta * g * ||W||/||g||`` (full-batch gradient ``g``) over a log grid of
``eta``. Plots the training loss and the relative change of the first layer's gradient against
``eta``, with deep relative trust's model of that change, ``(1 + eta)^L - 1``, and the descent
lemma's bound ``max_safe_lr(L)``.

    python examples/trust_breakdown.py [--quick] [--out DIR]
"""
from __future__ import annotations

import os
import sys

import matplotlib.pyplot as plt
import torch

from fromage_fused import Fromage, deep_relative_trust, max_safe_lr
from _common import Clock, digits, log_grid, mlp, out_dir, parse_args, train, weights, write_summary


def loss_and_grads(net, x, y):
    net.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss.item(), [w.grad.detach().clone() for w in weights(net)]


def probe(net, x, y, etas):
    """Loss, first-layer gradient change and deep relative trust after each perturbation size."""
    loss0, grads = loss_and_grads(net, x, y)
    original = [w.detach().clone() for w in weights(net)]
    rows = []
    for eta in etas:
        with torch.no_grad():
            for w, w0, g in zip(weights(net), original, grads):
                w.copy_(w0 - eta * g * (w0.norm() / g.norm()))
        loss, new_grads = loss_and_grads(net, x, y)
        change = ((new_grads[0] - grads[0]).norm() / grads[0].norm()).item()
        drt = deep_relative_trust(original, weights(net)).item()
        rows.append((eta, loss, change, drt))
    with torch.no_grad():
        for w, w0 in zip(weights(net), original):
            w.copy_(w0)
    return loss0, rows


def main(argv=None) -> dict:
    args = parse_args(__doc__.splitlines()[0], argv)
    path = out_dir(args, "trust_breakdown")
    depths = [2, 4] if args.quick else [2, 16]
    width = 16 if args.quick else 64
    checkpoints = [0, 5] if args.quick else [0, 100, 1000]
    etas = log_grid(1e-3, 10.0, 4 if args.quick else 21)
    lr = 0.01
    x, y, _, _ = digits(args.seed)
    clock = Clock()
    results = {}  # depth -> checkpoint -> (loss0, rows)
    for depth in depths:
        net = mlp(depth, width, seed=args.seed, init=args.init)
        opt = Fromage(net.parameters(), lr=lr)
        done = 0
        for c in checkpoints:
            train(net, opt, x, y, steps=c - done, seed=args.seed + c)
            done = c
            results.setdefault(depth, {})[c] = probe(net, x, y, etas)
            print(f"depth {depth} step {c}: probed [{clock}]", flush=True)

    fig, axes = plt.subplots(2, len(depths), figsize=(5 * len(depths), 7), squeeze=False)
    for col, depth in enumerate(depths):
        for c, (loss0, rows) in results[depth].items():
            e = [r[0] for r in rows]
            line, = axes[0][col].plot(e, [r[1] for r in rows], "o-", ms=3, label=f"step {c}")
            axes[0][col].axhline(loss0, color=line.get_color(), lw=0.5, ls=":")
            axes[1][col].plot(e, [max(r[2], 1e-8) for r in rows], "o-", ms=3, color=line.get_color(), label=f"step {c}")
        e = [r[0] for r in rows]
        axes[1][col].plot(e, [(1 + v) ** depth - 1 for v in e], "k--", lw=1, label="(1+eta)^L - 1")
        for row in axes:
            row[col].axvline(max_safe_lr(depth), color="gray", lw=1, ls="-.", label="max_safe_lr(L)")
            row[col].set_xscale("log")
            row[col].set_xlabel("relative perturbation eta of every layer")
        axes[0][col].set_yscale("log")
        axes[1][col].set_yscale("log")
        axes[0][col].set_title(f"depth {depth}: training loss")
        axes[1][col].set_title(f"depth {depth}: relative change of layer-1 gradient")
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=7)
    fig.suptitle("Perturbing every layer along its gradient (MLP on digits, trained with Fromage lr 0.01)")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "trust_breakdown.png"), dpi=90)
    plt.close(fig)

    lines = [f"trust breakdown: width {width}, checkpoints {checkpoints} (Fromage lr {lr}), eta grid {etas[0]:g}..{etas[-1]:g}"]
    for depth in depths:
        lines.append(f"depth {depth}: max_safe_lr = {max_safe_lr(depth):.4f}")
        for c, (loss0, rows) in results[depth].items():
            best = min(rows, key=lambda r: r[1])
            worse = [r[0] for r in rows if r[1] > loss0]
            unity = [r[0] for r in rows if r[2] >= 1.0]
            lines.append(
                f"  step {c:4d}: loss {loss0:.3f}; best eta {best[0]:.3g} (loss {best[1]:.3f}); "
                f"loss rises above start from eta {min(worse) if worse else float('nan'):.3g}; "
                f"layer-1 gradient change >= 100% from eta {min(unity) if unity else float('nan'):.3g}"
            )
    # Every layer moved by exactly eta relative to itself, so the distance is (1 + eta)^L - 1.
    err = max(abs(r[3] - ((1 + r[0]) ** d - 1)) / ((1 + r[0]) ** d - 1) for d in depths for _, rows in results[d].values() for r in rows)
    lines.append(f"deep_relative_trust of each perturbation vs (1 + eta)^L - 1: max relative difference {err:.2g}")
    lines.append(f"wall time {clock}")
    write_summary(path, lines, args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
