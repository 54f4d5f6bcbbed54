"""Figure 2 in its own setting: the spectrally normalised layers of Table 1's GAN under LARS and Fromage.

The paper's claim: a spectrally normalised layer computes with ``W / sigma(W)``, so its output
does not depend on the scale of its raw weight ``W`` (torch's ``weight_orig``) and the gradient
is orthogonal to ``W``; each LARS step (Fromage without the 1/sqrt(1+lr^2) prefactor, the authors'
LARS baseline, no momentum or weight decay) then multiplies ``||W||`` by sqrt(1 + lr^2), and the
norms grow without bound, while Fromage's prefactor holds them fixed. The authors showed it in
their class-conditional CIFAR-10 GAN at lr 0.01; here it is the GAN of ``table1.py`` (examples/_gan.py)
trained with LARS and with Fromage at lr 0.01 for the authors' number of steps (120 epochs of 196
batches of 256, lr / 10 at epoch 100), 2 seeds, the norm of every spectrally normalised layer
recorded every 196 steps, the Frechet distance and classifier accuracy every 1,960. Equal
distances are possible and not a failure to reproduce: the normalised layers compute the same
function at any scale, and the two optimizers differ only on the biases and batch-norm scales.

    python examples/prefactor_gan.py [--quick] [--out DIR] [--steps N] [--seeds N] [--fresh] [--report-only]
"""
from __future__ import annotations

import math
import os
import statistics
import sys

import matplotlib.pyplot as plt

from _common import COLORS, Runs, add_provenance_args, out_dir, parser, save_figure, write_summary
from _gan import DECAY_AT, train_gan

LR = 0.01
AUTHORS_STEPS = 120 * 196  # 50,000 CIFAR-10 images in batches of 256, 120 epochs
OPTIMIZERS = ["LARS", "Fromage"]


def lars_theory(step: int, steps: int, lr: float) -> float:
    """||W_t|| / ||W_0|| for a LARS step orthogonal to W: sqrt(1 + lr_s^2) compounded over the
    steps before ``step``, with the lr divided by 10 from the decay step on."""
    decay = int(steps * DECAY_AT)
    before, after = min(step, decay), max(0, step - decay)
    return math.exp(0.5 * (before * math.log1p(lr * lr) + after * math.log1p(lr * lr / 100)))


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=AUTHORS_STEPS)
    p.add_argument("--seeds", type=int, default=2)
    add_provenance_args(p)
    args = p.parse_args(argv)
    norms_every, score_every = 196, 1960
    if args.quick:
        args.steps, args.seeds, norms_every, score_every = 40, 1, 10, 20
    path = out_dir(args, "prefactor_gan-quick" if args.quick else "prefactor_gan")
    runs = Runs(path, "prefactor_gan.py", argv, fresh=args.fresh, report_only=args.report_only, shard=args.shard)
    results = {}  # optimizer -> [result per seed]
    for name in OPTIMIZERS:
        for seed in range(args.seeds):
            settings = {"optimizer": name, "lr": LR, "seed": seed, "steps": args.steps, "norms_every": norms_every,
                        "score_every": score_every}
            rec = runs.get(settings, lambda: train_gan(name, LR, seed, args.steps, norms_every=norms_every,
                                                       score_every=score_every))
            if rec is None:
                continue
            results.setdefault(name, []).append(rec["result"])
            r = rec["result"]
            print(f"{name:7s} seed {seed}: Frechet distance {r['distance']}, accuracy {r['accuracy']:.3f}  "
                  f"[{rec['seconds']:.0f} s]", flush=True)

    if args.shard:
        runs.finish_shard(args.shard)
    layers = [k for k in results["LARS"][0]["norms"] if k != "step"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in OPTIMIZERS:
        for k, r in enumerate(results[name]):
            steps = r["norms"]["step"]
            for layer in layers:
                ratio = [v / r["norms"][layer][0] for v in r["norms"][layer]]
                axes[0].plot(steps, ratio, "-", color=COLORS[name], lw=0.8, alpha=0.6,
                             label=(f"{name}: each normalised layer, each seed" if k == 0 and layer == layers[0]
                                    else None))
            s = r["scores"]
            axes[1].plot(s["step"], [math.nan if v is None else v for v in s["distance"]], "o-", ms=3,
                         color=COLORS[name], alpha=0.7, label=f"{name}, seed {k}")
    steps = results["LARS"][0]["norms"]["step"]
    axes[0].plot(steps, [lars_theory(t, args.steps, LR) for t in steps], "k--", lw=1.2,
                 label="LARS theory: prod sqrt(1 + lr_t^2)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("||weight_orig|| / its initial value")
    axes[0].set_title(f"spectrally normalised layers (G and D, {len(layers)} layers), lr {LR:g}")
    axes[0].legend(fontsize=8, loc="upper left")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("Frechet distance to the training digits (lower is better)")
    axes[1].set_title("generator quality during training")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Table 1's class-conditional GAN on digits: LARS (no prefactor) vs Fromage at lr {LR:g}, "
                 f"{args.steps} steps"
                 + (" (--quick)" if args.quick else ""))
    fig.tight_layout()
    save_figure(fig, os.path.join(path, "prefactor_gan.png"))
    plt.close(fig)

    lines = [
        "Prefactor in its own setting (paper Figure 2): the spectrally normalised layers of Table 1's GAN on digits.",
        "protocol (here | the authors'):",
        "  network: class-conditional MLP GAN (examples/_gan.py), spectral norm on every G and D layer, BN in G, hinge "
        "loss | conv ResNet GAN with self-attention on CIFAR-10, the same normalisation and loss",
        f"  training: batch 256, lr {LR:g} for G and D, {args.steps} steps, lr/10 at {DECAY_AT:.3f} of them | batch "
        f"256, lr 0.01, {AUTHORS_STEPS} steps (120 epochs), lr/10 at epoch 100",
        "  as the authors: LARS = Fromage without the prefactor (Fromage(..., prefactor=False)), no momentum or weight "
        "decay",
        f"results ({args.seeds} seed(s); ratio = ||weight_orig|| at the end / at the start, over the {len(layers)} "
        "normalised layers):",
    ]
    end = args.steps
    theory = lars_theory(end, args.steps, LR)
    for name in OPTIMIZERS:
        ratios = [r["norms"][layer][-1] / r["norms"][layer][0] for r in results[name] for layer in layers]
        dist = [r["distance"] for r in results[name]]
        acc = [r["accuracy"] for r in results[name]]
        lines.append(f"  {name:7s}: norm ratio {min(ratios):.4f}..{max(ratios):.4f}; Frechet distance "
                     f"{statistics.fmean(dist):.4g} [{min(dist):.4g}, {max(dist):.4g}]; classifier accuracy "
                     f"{statistics.fmean(acc):.3f}")
    lars = [r["norms"][layer][-1] / r["norms"][layer][0] for r in results["LARS"] for layer in layers]
    fro = [r["norms"][layer][-1] / r["norms"][layer][0] for r in results["Fromage"] for layer in layers]
    worst = max(abs(v / theory - 1) for v in lars)
    lines.append(f"  LARS theory at step {end}: {theory:.4f}; the largest relative deviation of a LARS layer from it: "
                 f"{worst:.2g}")
    grows = min(lars) > 1 and worst < 0.01
    fixed = max(abs(v - 1) for v in fro) < 0.01
    if grows and fixed:
        verdict = ("the paper's mechanism holds: every normalised layer's norm grows under LARS as sqrt(1 + lr^2) per "
                   f"step (x{theory:.4g} after {end} steps, within a relative {worst:.1e} of theory), while Fromage "
                   f"holds every one within a relative {max(abs(v - 1) for v in fro):.1e} of its start")
    else:
        verdict = "not shown by this run: " + ("LARS's norms do not follow sqrt(1 + lr^2) per step" if not grows
                                               else "Fromage's norms moved by more than 1%")
    lines.append(f"verdict: {verdict}.")
    lines += runs.provenance()
    write_summary(path, lines)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
