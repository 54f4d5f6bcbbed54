"""Figure 3 on digits: how deep a plain MLP can be and still train, with SGD, Adam and Fromage.

The authors' protocol (their MNIST depth notebook), kept except for the data and the scale: N
hidden ``Linear -> ReLU`` layers with biases and a final ``Linear`` (depth = N, the hidden layers),
PyTorch's default initialisation, no batch norm or skips; SGD with momentum 0.9 at lr 1, 0.1, 0.01;
Adam at 1e-2, 1e-3, 1e-4; Fromage at 0.1, 0.01, 0.001; batch 250; lr x0.95 every 240 steps (one
of their epochs); score = mean minibatch training accuracy over the last 240 steps, best lr per
optimizer. Here: scikit-learn's digits (1437 training images of 64 pixels) instead of MNIST, width
128 instead of 784, and 2000 steps instead of their 24,000 (100 epochs), to fit a CPU.

Ablations, labelled in their output folder's name: ``--init he`` (He-normal weights, zero
biases) and ``--no-bias``. Each finished run is appended to ``runs.jsonl`` in the output folder
and reused by a later call with the same settings, so an interrupted study resumes (``--fresh``
ignores it).

    python examples/depth.py [--quick] [--out DIR] [--init he] [--no-bias] [--steps N] [--width W] [--fresh]
"""
from __future__ import annotations

import json
import math
import os
import sys

import matplotlib.pyplot as plt
import torch

from _common import (AUTHORS_EPOCH, COLORS, OPTIMIZER_NAMES, Clock, authors_mlp, batches, command, decay_every, digits,
                     make_optimizer, out_dir, parser, write_summary)

LRS = {"SGD": [1.0, 0.1, 0.01], "Adam": [1e-2, 1e-3, 1e-4], "Fromage": [0.1, 0.01, 0.001]}
DEPTHS = [2, 5, 10, 20, 25, 30, 50]
AUTHORS_STEPS = 100 * AUTHORS_EPOCH
BATCH = 250
CHANCE = 0.1
TRAINS = 2 * CHANCE  # "trains": a last-epoch accuracy at least twice chance


def run(hidden: int, name: str, lr: float, args, x, y):
    """Mean minibatch accuracy over the last epoch, and per-epoch means (None if it diverged)."""
    net = authors_mlp(hidden, args.width, bias=not args.no_bias, init=args.init, seed=args.seed)
    opt = make_optimizer(name, net.parameters(), lr, momentum=0.9)
    stream = batches(len(x), BATCH, args.seed)
    accs = []
    for step in range(args.steps):
        if step and step % AUTHORS_EPOCH == 0:
            decay_every(opt, 0.95)
        idx = next(stream)
        out = net(x[idx])
        loss = torch.nn.functional.cross_entropy(out, y[idx])
        if not torch.isfinite(loss):
            return None, []
        accs.append((out.argmax(1) == y[idx]).float().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    accs = torch.stack(accs).tolist()
    epoch = min(AUTHORS_EPOCH, len(accs))
    curve = [sum(accs[i:i + epoch]) / len(accs[i:i + epoch]) for i in range(0, len(accs), epoch)]
    return sum(accs[-epoch:]) / epoch, curve


def name_of(args) -> str:
    return "depth" + ("-he-init" if args.init == "he" else "") + ("-no-bias" if args.no_bias else "")


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--init", choices=["default", "he"], default="default", help="default: PyTorch's (the authors'); he: ablation")
    p.add_argument("--no-bias", action="store_true", help="ablation: linear layers without biases")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depths", type=lambda s: [int(v) for v in s.split(",")], default=DEPTHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore the runs recorded in the output folder's runs.jsonl")
    args = p.parse_args(argv)
    lrs = LRS
    if args.quick:
        args.steps, args.width, args.depths = 30, 16, [2, 6]
        lrs = {k: v[1:2] for k, v in LRS.items()}
    path = out_dir(args, name_of(args))
    x, y, _, _ = digits(args.seed)
    clock = Clock()
    results = {n: {} for n in OPTIMIZER_NAMES}  # name -> depth -> lr -> (score or None, curve)
    cache_path = os.path.join(path, "runs.jsonl")
    cache, reused, seconds = {}, 0, []
    if os.path.exists(cache_path) and not args.fresh:
        with open(cache_path) as f:
            for line in f:
                rec = json.loads(line)
                cache[rec["key"]] = (rec["score"], rec["curve"], rec.get("seconds"))
    for depth in args.depths:
        for name in OPTIMIZER_NAMES:
            for lr in lrs[name]:
                key = f"depth={depth} {name} lr={lr:g} width={args.width} steps={args.steps} init={args.init} bias={not args.no_bias} seed={args.seed}"
                if key in cache:
                    score, curve, took = cache[key]
                    reused += 1
                else:
                    start = clock.seconds()
                    score, curve = run(depth, name, lr, args, x, y)
                    took = round(clock.seconds() - start, 1)
                    with open(cache_path, "a") as f:
                        f.write(json.dumps({"key": key, "score": score, "curve": curve, "seconds": took}) + "\n")
                seconds.append(took)
                results[name].setdefault(depth, {})[lr] = (score, curve)
                shown = "diverged" if score is None else f"{score:.3f}"
                print(f"depth {depth:2d} {name:7s} lr {lr:g}: last-epoch train acc {shown}  [{clock}]", flush=True)

    def best(name, depth):
        """(score, lr) of the best lr; a diverged run counts as chance."""
        return max((CHANCE if s is None else s, lr) for lr, (s, _) in results[name][depth].items())

    depths = args.depths
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in OPTIMIZER_NAMES:
        axes[0].plot(depths, [best(name, d)[0] for d in depths], "o-", color=COLORS[name], label=name)
        for k, lr in enumerate(lrs[name]):
            scores = [results[name][d][lr][0] for d in depths]
            axes[1].plot(depths, [CHANCE if s is None else s for s in scores], ".-", color=COLORS[name],
                         alpha=0.35 + 0.65 * k / max(len(lrs[name]) - 1, 1), label=f"{name} lr {lr:g}")
            bad = [d for d, s in zip(depths, scores) if s is None]
            axes[1].plot(bad, [CHANCE] * len(bad), "x", color=COLORS[name], ms=8)
        deepest = depths[-1]
        _, lr = best(name, deepest)
        curve = results[name][deepest][lr][1]
        axes[2].plot([min(AUTHORS_EPOCH * (i + 1), args.steps) for i in range(len(curve))], curve, "o-", color=COLORS[name], label=f"{name} lr {lr:g}")
    for ax in axes[:2]:
        ax.set_xlabel("depth (hidden layers)")
        ax.set_ylabel("last-epoch minibatch train accuracy")
        ax.set_ylim(0, 1.02)
        ax.axhline(CHANCE, color="gray", lw=0.8, ls=":")
    axes[0].set_title("best lr of each optimizer's grid")
    axes[1].set_title("every lr (darker = earlier in grid; x = diverged)")
    axes[1].legend(fontsize=6, ncol=3, loc="center right")
    axes[0].legend()
    axes[2].set_title(f"depth {depths[-1]}: training curve at the best lr")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel(f"mean minibatch train accuracy, per {AUTHORS_EPOCH} steps")
    axes[2].set_ylim(0, 1.02)
    axes[2].legend(fontsize=8)
    label = {"default": "PyTorch default init", "he": "He init (ablation)"}[args.init] + (", no biases (ablation)" if args.no_bias else ", biases")
    fig.suptitle(f"Plain MLPs on digits, width {args.width}, {label}; {args.steps} steps of batch {BATCH}")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "depth.png"), dpi=90)
    plt.close(fig)

    def deepest_trained(name):
        ok = [d for d in depths if best(name, d)[0] >= TRAINS]
        return max(ok) if ok else None

    lines = [
        "Depth study (paper Figure 3) on scikit-learn's digits.",
        f"command: {command('depth.py', argv)}",
        "protocol (here | the authors'):",
        f"  data:   digits, 1437 training images of 64 pixels | MNIST, 60,000 images of 784",
        f"  width:  {args.width} | 784",
        f"  steps:  {args.steps} of batch {BATCH}, {args.steps / AUTHORS_EPOCH:.1f} of their epochs | {AUTHORS_STEPS}, 100 epochs of 240 steps",
        f"  init:   {'PyTorch default' if args.init == 'default' else 'He-normal, zero biases (ablation)'} | PyTorch default",
        f"  biases: {'no (ablation)' if args.no_bias else 'yes'} | yes",
        "  as the authors: hidden Linear+ReLU layers and a final Linear, no batch norm or skips, depth = hidden layers;",
        "  SGD with momentum 0.9, Adam, Fromage over the lr grids below; lr x0.95 every 240 steps; score = mean",
        "  minibatch train accuracy over the last 240 steps, best lr per optimizer (a diverged run scores chance, 0.1)",
        f"lr grids: {json.dumps(lrs)}",
        "best last-epoch train accuracy (lr) by depth:",
        "depth " + "".join(f"{n:>18s}" for n in OPTIMIZER_NAMES),
    ]
    for d in depths:
        lines.append(f"{d:5d} " + "".join(f"{best(n, d)[0]:11.3f} ({best(n, d)[1]:<5g})" for n in OPTIMIZER_NAMES))
    reach = {n: deepest_trained(n) for n in OPTIMIZER_NAMES}
    lines.append(f"deepest depth with accuracy >= {TRAINS:g} (twice chance): " + ", ".join(f"{n} {reach[n]}" for n in OPTIMIZER_NAMES))
    others = [reach[n] or 0 for n in ("SGD", "Adam")]
    f_reach = reach["Fromage"] or 0
    if f_reach > max(others):
        verdict = (f"the paper's claim holds here: Fromage trains deeper nets (to depth {f_reach}) than SGD ({reach['SGD']}) "
                   f"and Adam ({reach['Adam']}) under the authors' protocol at this scale")
    elif f_reach == max(others):
        verdict = "not shown here: Fromage trains no deeper than the best of SGD and Adam at this scale"
    else:
        verdict = "contradicted here: SGD or Adam trains deeper than Fromage at this scale"
    lines.append(f"verdict: {verdict}.")
    timed = [t for t in seconds if t is not None]
    lines.append(f"wall time {sum(timed):.0f} s summed over the {len(timed)} of {len(seconds)} runs whose time was recorded, on "
                 f"{torch.get_num_threads()} CPU thread(s){', --quick' if args.quick else ''}; seed {args.seed}"
                 + (f"; {reused} runs reused from runs.jsonl (written by earlier calls of this command)" if reused else ""))
    write_summary(path, lines)
    return {n: {d: {lr: s for lr, (s, _) in by_lr.items()} for d, by_lr in r.items()} for n, r in results.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
