"""Figure 1 on digits: how far a step along the gradient can be trusted, by depth, through training.

The authors' protocol (their MNIST curvature notebook), kept except for the data: MLPs of width 784
with biases and PyTorch's default initialisation, trained with Fromage at lr 0.01 decayed x0.9 per
epoch of 240 steps of batch 250, checkpoints early in training (their batches 0, 12, 24, 48, 96)
and then per epoch; at each checkpoint every weight and bias is moved along the fixed full-batch
gradient by a relative amount eta (``W - eta * ||W|| g / ||g||``), eta = 0, 0.001, ..., 0.1, and
the full-batch loss and the relative change of the first layer's gradient are measured
(``fromage_fused.trust.gradient_breakdown``); a plain MLP of L = 2 and 16 linear layers and a
residual one of 16. Here: scikit-learn's digits (all 1437 training images in the full batch)
instead of MNIST, checkpoints at steps 0, 24, 96, 240 and 480 (the last two are the ends of their
epochs 1 and 2, where the nets have fitted digits: the trained regime).

Deep relative trust models the gradient's change as ``(1 + eta)^L - 1``; L is given both ways:
the weight matrices (the paper's count) and every tensor the probe moves, biases too
(``Breakdown.moved``). Depth is scored by the growth rate of the change at small eta (its slope
over eta <= 0.003), which the model puts at L; the eta at which the change first reaches 100% is
reported too. A checkpoint whose network classifies the training set at chance (accuracy < 0.2)
after training has started is labelled "at chance": such a net has lost (or never found) a
direction worth trusting, and a change near 1 there is not a breakdown.

    python examples/trust_breakdown.py [--quick] [--out DIR] [--width W] [--fresh] [--report-only]
"""
from __future__ import annotations

import math
import os
import sys

import matplotlib.pyplot as plt
import torch

from fromage_fused import Fromage, max_safe_lr
from fromage_fused.trust import count_layers, gradient_breakdown
from _common import (AUTHORS_EPOCH, Runs, add_provenance_args, batches, decay_every, digits, finite_or_none, out_dir,
                     parser, save_figure, write_summary)

BATCH = 250
CONFIGS = [("mlp", 2), ("mlp", 16), ("residual", 16)]  # (architecture, L = weight matrices)
CHECKPOINTS = [0, 24, 96, 240, 480]
CHANCE_ACC = 0.2
SLOPE_POINTS = 3
CHANGE_TOP = 1e4


class Residual(torch.nn.Module):
    """``Linear(64, W) -> ReLU``, then ``L - 2`` blocks ``h + ReLU(Linear(h))``, then ``Linear(W, 10)``."""

    def __init__(self, depth: int, width: int):
        super().__init__()
        self.inp = torch.nn.Linear(64, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth - 2))
        self.out = torch.nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.out(h)


def build(arch: str, depth: int, width: int, seed: int) -> torch.nn.Module:
    """L linear layers with biases, PyTorch's default init; ReLU between."""
    torch.manual_seed(seed)
    if arch == "residual":
        return Residual(depth, width)
    sizes = [64] + [width] * (depth - 1) + [10]
    layers = []
    for i in range(depth):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def probe(arch, depth, args, etas, checkpoints, x, y) -> dict:
    """Train one net and probe it at each checkpoint."""
    net = build(arch, depth, args.width, args.seed)
    opt = Fromage(net.parameters(), lr=0.01)
    stream = batches(len(x), BATCH, args.seed)
    layer = next(n for n, p in net.named_parameters() if p.dim() == 2)
    out, step = {}, 0
    for target in checkpoints:
        while step < target:
            if step and step % AUTHORS_EPOCH == 0:
                decay_every(opt, 0.9)
            idx = next(stream)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
        b = gradient_breakdown(net, torch.nn.functional.cross_entropy, x, y, etas, layers=[layer])
        with torch.no_grad():
            logits = net(x)
        # A large move can overflow the loss (and so the gradient): written as null, read back as inf.
        out[str(target)] = {"loss0": b.loss0.item(), "loss": [finite_or_none(v) for v in b.loss.tolist()],
                            "change": [finite_or_none(v) for v in b.grad_change[:, 0].tolist()],
                            "accuracy": (logits.argmax(1) == y).float().mean().item(), "moved": int(b.moved.item()),
                            "output_spread": logits.std(0).mean().item()}
        print(f"{arch} L={depth} step {target}: probed", flush=True)
    return {"checkpoints": out, "matrices": count_layers(net, matrices_only=True), "tensors": count_layers(net),
            "layer": layer}


def growth_rate(etas, change) -> float:
    """Least-squares slope through the origin of the change against eta, over the three smallest
    nonzero etas (0.001 to 0.003 on the full grid)."""
    pts = [(e, c) for e, c in zip(etas, change) if e > 0][:SLOPE_POINTS]
    return sum(e * c for e, c in pts) / sum(e * e for e, _ in pts)


def first_at_least(etas, values, level):
    hit = [e for e, v in zip(etas, values) if v >= level]
    return min(hit) if hit else None


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=784)
    p.add_argument("--seed", type=int, default=0)
    add_provenance_args(p)
    args = p.parse_args(argv)
    configs, checkpoints, points = CONFIGS, CHECKPOINTS, 101
    if args.quick:
        configs, checkpoints, points, args.width = CONFIGS, [0, 12], 11, 16
    etas = [round(0.1 * i / (points - 1), 6) for i in range(points)]
    path = out_dir(args, "trust_breakdown-quick" if args.quick else "trust_breakdown")
    runs = Runs(path, "trust_breakdown.py", argv, fresh=args.fresh, report_only=args.report_only, shard=args.shard)
    x, y, _, _ = digits(0)
    results = {}
    for arch, depth in configs:
        settings = {"arch": arch, "depth": depth, "width": args.width, "seed": args.seed, "checkpoints": checkpoints,
                    "etas": etas}
        rec = runs.get(settings, lambda: probe(arch, depth, args, etas, checkpoints, x, y))
        if rec is not None:
            results[(arch, depth)] = _read_back(rec["result"])
    if args.shard:
        runs.finish_shard(args.shard)
    plot(path, args, configs, checkpoints, etas, results)
    lines = report(args, configs, checkpoints, etas, results, runs)
    write_summary(path, lines)
    return results


def _read_back(result: dict) -> dict:
    """A record's result with the nulls of an overflowed loss or gradient change as inf."""
    checkpoints = {step: {**c, **{k: [math.inf if v is None else v for v in c[k]] for k in ("loss", "change")}}
                   for step, c in result["checkpoints"].items()}
    return {**result, "checkpoints": checkpoints}


def at_chance(c, step) -> bool:
    """Trained, and still or again classifying at chance (an untrained net is at chance by definition)."""
    return step > 0 and c["accuracy"] < CHANCE_ACC


def plot(path, args, configs, checkpoints, etas, results) -> None:
    fig, axes = plt.subplots(2, len(configs), figsize=(5.2 * len(configs), 10.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for col, (arch, depth) in enumerate(configs):
        r = results[(arch, depth)]
        for k, step in enumerate(checkpoints):
            c = r["checkpoints"][str(step)]
            dead = at_chance(c, step)
            color = "0.6" if dead else cmap(k / max(len(checkpoints) - 1, 1))
            label = f"step {step}" + (" (at chance: no breakdown)" if dead else f", train acc {c['accuracy']:.2f}")
            style = dict(ls="--" if dead else "-", lw=1.2, color=color, label=label)
            axes[0][col].plot(etas, c["loss"], **style)
            axes[1][col].plot(etas[1:], c["change"][1:], **style)
        lw, la = r["matrices"], max(c["moved"] for c in r["checkpoints"].values())
        axes[1][col].plot(etas[1:], [(1 + e) ** lw - 1 for e in etas[1:]], "k-", lw=0.9,
                          label=f"(1+eta)^L - 1, L = {lw} weight matrices")
        axes[1][col].plot(etas[1:], [(1 + e) ** la - 1 for e in etas[1:]], "k:", lw=1.2,
                          label=f"(1+eta)^L - 1, L = {la} moved tensors")
        for row in axes:
            for L, ls in ((lw, "-."), (la, (0, (1, 3)))):
                if max_safe_lr(L) <= etas[-1]:
                    row[col].axvline(max_safe_lr(L), color="gray", lw=1, ls=ls)
            row[col].set_xlabel("relative perturbation eta of every tensor")
        axes[0][col].set_yscale("log")
        axes[1][col].set_yscale("log")
        # A change beyond CHANGE_TOP (an overflowing net) would squash every other curve: the panel stops there.
        changes = [v for c in r["checkpoints"].values() for v in c["change"][1:] if math.isfinite(v)]
        if any(v > CHANGE_TOP for c in r["checkpoints"].values() for v in c["change"][1:]):
            axes[1][col].set_ylim(top=CHANGE_TOP)
            axes[1][col].text(0.02, 0.97, f"curves leaving the top exceed {CHANGE_TOP:g}",
                              transform=axes[1][col].transAxes, va="top", fontsize=7)
        elif changes:
            axes[1][col].set_ylim(top=max(changes) * 2)
        axes[1][col].set_xscale("log")
        axes[0][col].set_title(f"{arch}, L = {lw}: full-batch training loss")
        axes[1][col].set_title(f"{arch}, L = {lw}: relative change of layer-1 gradient")
        axes[0][col].set_ylabel("loss (grey lines: max_safe_lr(L), both counts)")
        axes[1][col].set_ylabel("||g(W + dW) - g(W)|| / ||g(W)||")
        axes[0][col].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        axes[1][col].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.suptitle(f"Moving every tensor by eta along the full-batch gradient (digits, width {args.width}, Fromage lr "
                 f"0.01 x0.9 per {AUTHORS_EPOCH} steps)" + (" (--quick)" if args.quick else ""))
    fig.tight_layout()
    save_figure(fig, os.path.join(path, "trust_breakdown.png"))
    plt.close(fig)


def report(args, configs, checkpoints, etas, results, runs) -> list:
    small = etas[1]
    lines = [
        "Gradient breakdown (paper Figure 1) on scikit-learn's digits.",
        "protocol (here | the authors'):",
        "  data: digits, all 1437 training images in the full batch | MNIST",
        f"  width {args.width}, biases, PyTorch default init | the same (width 784)",
        f"  Fromage lr 0.01 x0.9 per {AUTHORS_EPOCH} steps of batch {BATCH}, checkpoints at steps "
        f"{', '.join(map(str, checkpoints))} | the same schedule, checkpoints at batches 0, 12, 24, 48, 96 and per "
        "epoch",
        f"  every tensor moved along the fixed full-batch gradient, eta = 0, {etas[1]:g}, ..., {etas[-1]:g} | the same",
        "  architectures: plain MLP of L linear layers, and a residual MLP (h + ReLU(Linear(h)) blocks) | MLP and a "
        "residual variant",
        "results (change = relative change of the first layer's gradient; rate = its slope over eta <= "
        f"{etas[SLOPE_POINTS]:g}; L both ways: weight matrices | moved tensors; 'at chance': trained, train accuracy < "
        f"{CHANCE_ACC:g};",
        "  output spread: std over the training set of the logits, mean over classes):",
    ]
    rates = {}
    above = {"matrices": [], "moved": []}
    for arch, depth in configs:
        r = results[(arch, depth)]
        lw = r["matrices"]
        lines.append(f"{arch}, L = {lw} matrices, {r['tensors']} tensors: max_safe_lr {max_safe_lr(lw):.4f} | "
                     f"{max_safe_lr(r['tensors']):.4f}")
        for step in checkpoints:
            c = r["checkpoints"][str(step)]
            la = c["moved"]
            rate = growth_rate(etas, c["change"])
            loss, l0 = c["loss"], c["loss0"]
            rises = [e for e, v in zip(etas, loss) if v > l0]
            unity = first_at_least(etas, c["change"], 1.0)
            chance = at_chance(c, step)
            rates[(arch, depth, step)] = (rate, chance)
            m_w, m_a = (1 + small) ** lw - 1, (1 + small) ** la - 1
            if not chance:
                above["matrices"].append(c["change"][1] / m_w)
                above["moved"].append(c["change"][1] / m_a)
            lines.append(
                f"  step {step:3d}: train acc {c['accuracy']:.3f}, loss {l0:.3g}, output spread "
                f"{c['output_spread']:.2g}{' (AT CHANCE)' if chance else ''}; rate {rate:.3g} "
                f"(model {lw} | {la}); change at eta {small:g}: {c['change'][1]:.3g} = {c['change'][1] / m_w:.2g} | "
                f"{c['change'][1] / m_a:.2g} x the model; change >= 100% from eta "
                f"{unity if unity is not None else '>0.1'}; loss above its start from eta "
                f"{min(rises) if rises else '>0.1'}")
    for key, name in (("matrices", "weight matrices"), ("moved", "moved tensors")):
        v = above[key]
        if v:
            lines.append(f"measured change / model at eta {small:g}, L = {name}, checkpoints not at chance: "
                         f"{min(v):.2g}..{max(v):.2g} (above the model at {sum(x > 1 for x in v)} of {len(v)})")
    if ("mlp", 2) in results and ("mlp", 16) in results:
        pairs = [(s, rates[("mlp", 2, s)], rates[("mlp", 16, s)]) for s in checkpoints]
        live = [(s, a[0], b[0]) for s, a, b in pairs if not (a[1] or b[1])]
        faster = [s for s, a, b in live if b > a]
        shown = ", ".join(f"step {s}: {b / a:.3g}" for s, a, b in live)
        lines.append("growth rate, 16-layer MLP / 2-layer MLP, at checkpoints where neither is at chance (model: 16/2 "
                     f"= 8 either way): {shown}")
        dead = [s for s, a, b in pairs if a[1] or b[1]]
        if dead:
            lines.append(f"  left out, a net at chance: steps {', '.join(map(str, dead))}")
        if live and len(faster) == len(live):
            verdict = (f"the paper's depth effect holds: at each of the {len(live)} checkpoints where both nets learn, "
                       "the 16-layer MLP's gradient changes faster with eta than the 2-layer one's")
        elif faster:
            verdict = f"the depth effect holds at {len(faster)} of {len(live)} checkpoints where both nets learn"
        else:
            verdict = "the depth effect is not shown at this scale"
        lines.append(f"verdict: {verdict}.")
    lines += runs.provenance()
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
