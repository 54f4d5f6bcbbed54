"""Figure 4 at toy scale: does Fromage's best learning rate stay put across tasks and architectures?

The paper's claim: tuned on very different benchmarks (CIFAR-10 classification with a ResNet, a
class-conditional GAN, a Transformer language model, ImageNet), Fromage's best learning rate is
the same, 0.01, while the best learning rates of SGD and Adam move from task to task. Here, four
small tasks with different architectures, each swept over the same learning-rate grid (1e-4 to 1,
half-decade steps) with SGD (momentum 0.9), Adam and Fromage, three seeds each:

- ``mlp``: the authors' depth-study MLP (3 hidden layers of width 64, biases, default init) on digits;
- ``resnet``: a small convolutional ResNet with BatchNorm and skips on digits as 8x8 images, with
  ``p_bound=1.0`` for Fromage (the paper's CIFAR-10 setting);
- ``transformer``: a 2-layer character-level causal Transformer on the dataset descriptions that
  scikit-learn ships (``sklearn/datasets/descr/*.rst``, about 43 KB of English text);
- ``gan``: a small MLP GAN on a ring of 8 Gaussians in 2-D, the same optimizer and lr for both nets.

The ResNet is also run with plain Fromage (no ``p_bound``): on a net this small the bound caps the
classifier's norm, and with it the logits. Metric (lower is better): test error on the 20% digits
test split (mlp, resnet; ties broken by test cross-entropy; BatchNorm statistics recomputed on the
whole training set before testing), held-out cross-entropy in nats per character (transformer:
the last 10% of the text), and for the GAN the squared MMD between 1000 generated and 1000 true
points. Constant learning rates; a run whose loss becomes inf/NaN counts as diverged.

    python examples/lr_transfer.py [--quick] [--out DIR] [--seeds N] [--from-json results.json]

``--from-json`` rebuilds the plot and the summary from the ``results.json`` of an earlier run.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from importlib import resources

import matplotlib.pyplot as plt
import torch

from _common import OPTIMIZER_NAMES, Clock, authors_mlp, batches, command, digits, log_grid, make_optimizer, out_dir, parser, write_summary

GRID = log_grid(1e-4, 1.0, 9)
CE = torch.nn.functional.cross_entropy


def _diverged(loss) -> bool:
    return not torch.isfinite(loss)


def _steps(model_params, opt, step_loss, steps) -> bool:
    """Minibatch training; False as soon as a loss is not finite."""
    for step in range(steps):
        loss = step_loss(step)
        if _diverged(loss):
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return True


def classify(net, x, y):
    """(test error, test cross-entropy); inf if the outputs are not finite."""
    with torch.no_grad():
        out = net(x)
    if not torch.isfinite(out).all():
        return math.inf, math.inf
    return (out.argmax(1) != y).float().mean().item(), CE(out, y).item()


@torch.no_grad()
def recompute_batchnorm(net, x):
    """Replace the running statistics by those of ``x`` in one batch, then switch to eval mode.

    Running averages lag weights that move by a fixed relative amount every step; statistics of
    the whole training set do not."""
    saved = {}
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            saved[m], m.momentum = m.momentum, None  # None: a cumulative average (here of one batch)
    net.train()
    net(x)
    for m, momentum in saved.items():
        m.momentum = momentum
    net.eval()


class MLPTask:
    name, metric = "mlp", "test error"
    optimizers = OPTIMIZER_NAMES

    def __init__(self, quick):
        self.steps = 10 if quick else 300
        self.data = digits(0)

    def run(self, opt_name, lr, seed):
        x, y, xt, yt = self.data
        net = authors_mlp(3, 64, seed=seed)
        opt = make_optimizer(opt_name, net.parameters(), lr)
        stream = batches(len(x), 250, seed)

        def step_loss(_):
            idx = next(stream)
            return CE(net(x[idx]), y[idx])

        if not _steps(net.parameters(), opt, step_loss, self.steps):
            return math.inf, math.inf
        return classify(net, xt, yt)


class _Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                                        torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c))

    def forward(self, h):
        return torch.relu(h + self.body(h))


class SmallResNet(torch.nn.Module):
    def __init__(self, channels=16, blocks=2):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(channels), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(*[_Block(channels) for _ in range(blocks)])
        self.head = torch.nn.Linear(channels, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ResNetTask:
    name, metric = "resnet", "test error"
    optimizers = OPTIMIZER_NAMES + ["Fromage, no p_bound"]

    def __init__(self, quick):
        self.steps = 10 if quick else 300
        self.data = digits(0, flat=False)

    def run(self, opt_name, lr, seed):
        x, y, xt, yt = self.data
        torch.manual_seed(seed)
        net = SmallResNet()
        opt = make_optimizer(opt_name.split(",")[0], net.parameters(), lr, p_bound=1.0 if opt_name == "Fromage" else None)
        stream = batches(len(x), 128, seed)

        def step_loss(_):
            idx = next(stream)
            return CE(net(x[idx]), y[idx])

        if not _steps(net.parameters(), opt, step_loss, self.steps):
            return math.inf, math.inf
        recompute_batchnorm(net, x)
        return classify(net, xt, yt)


def shipped_text() -> str:
    """The dataset descriptions inside scikit-learn's wheel, in file-name order."""
    folder = resources.files("sklearn.datasets") / "descr"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst"))
    return "\n".join((folder / n).read_text(encoding="utf-8") for n in names)


class CharLM(torch.nn.Module):
    def __init__(self, vocab, context, d=64, layers=2, heads=4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(context, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx):
        h = self.emb(idx) + self.pos[: idx.shape[1]]
        return self.head(self.blocks(h, mask=self.mask[: idx.shape[1], : idx.shape[1]], is_causal=True))


class TransformerTask:
    name, metric = "transformer", "held-out nats/char"
    optimizers = OPTIMIZER_NAMES
    context, batch = 32, 32

    def __init__(self, quick):
        self.steps = 10 if quick else 300
        text = shipped_text()
        chars = sorted(set(text))
        ids = torch.tensor([chars.index(c) for c in text])
        cut = int(0.9 * len(ids))
        self.vocab, self.train_ids, self.val_ids = len(chars), ids[:cut], ids[cut:]
        gen = torch.Generator().manual_seed(1234)
        starts = torch.randint(len(self.val_ids) - self.context - 1, (8 if quick else 64,), generator=gen)
        self.val = torch.stack([self.val_ids[s:s + self.context + 1] for s in starts.tolist()])

    def run(self, opt_name, lr, seed):
        torch.manual_seed(seed)
        net = CharLM(self.vocab, self.context)
        opt = make_optimizer(opt_name, net.parameters(), lr)
        gen = torch.Generator().manual_seed(seed)

        def step_loss(_):
            starts = torch.randint(len(self.train_ids) - self.context - 1, (self.batch,), generator=gen)
            chunk = torch.stack([self.train_ids[s:s + self.context + 1] for s in starts.tolist()])
            return CE(net(chunk[:, :-1]).reshape(-1, self.vocab), chunk[:, 1:].reshape(-1))

        if not _steps(net.parameters(), opt, step_loss, self.steps):
            return math.inf, math.inf
        with torch.no_grad():
            loss = CE(net(self.val[:, :-1]).reshape(-1, self.vocab), self.val[:, 1:].reshape(-1))
        v = loss.item() if torch.isfinite(loss) else math.inf
        return v, v


def ring(n, gen):
    centres = torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1) * 2.0
    return centres[torch.randint(8, (n,), generator=gen)] + 0.05 * torch.randn(n, 2, generator=gen)


def mmd2(a, b, scales=(0.05, 0.2, 1.0)):
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (biased estimate)."""
    def k(u, v):
        d2 = torch.cdist(u, v).square()
        return sum(torch.exp(-d2 / (2 * s * s)) for s in scales)
    return (k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()).item()


class GANTask:
    name, metric = "gan", "MMD^2 to the data"
    optimizers = OPTIMIZER_NAMES
    batch = 128

    def __init__(self, quick):
        self.steps = 10 if quick else 600
        gen = torch.Generator().manual_seed(99)
        self.real = ring(1000, gen)
        self.noise = torch.randn(1000, 2, generator=gen)

    def run(self, opt_name, lr, seed):
        torch.manual_seed(seed)
        G = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
        D = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        opt_g, opt_d = make_optimizer(opt_name, G.parameters(), lr), make_optimizer(opt_name, D.parameters(), lr)
        gen = torch.Generator().manual_seed(seed)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        ones, zeros = torch.ones(self.batch, 1), torch.zeros(self.batch, 1)
        for _ in range(self.steps):
            real, z = ring(self.batch, gen), torch.randn(self.batch, 2, generator=gen)
            d_loss = bce(D(real), ones) + bce(D(G(z).detach()), zeros)
            if _diverged(d_loss):
                return math.inf, math.inf
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            g_loss = bce(D(G(z)), ones)  # the non-saturating generator loss
            if _diverged(g_loss):
                return math.inf, math.inf
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
        with torch.no_grad():
            fake = G(self.noise)
        v = mmd2(fake, self.real) if torch.isfinite(fake).all() else math.inf
        return v, v


TASKS = [MLPTask, ResNetTask, TransformerTask, GANTask]


STYLE = {"SGD": ("tab:blue", "o-"), "Adam": ("tab:orange", "o-"), "Fromage": ("tab:green", "o-"), "Fromage, no p_bound": ("tab:green", "s--")}


def stats(runs):
    """(mean, std, tiebreak mean) over seeds; a diverged seed makes the point diverged (inf)."""
    values = [r[0] for r in runs]
    if not all(math.isfinite(v) for v in values):
        return math.inf, 0.0, math.inf
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, statistics.fmean(r[1] for r in runs)


def best_lr(by_lr):
    return min(by_lr, key=lambda lr: (stats(by_lr[lr])[0], stats(by_lr[lr])[2], lr))


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--from-json", default=None, help="rebuild the plot and summary from this results.json")
    args = p.parse_args(argv)
    grid = GRID
    if args.quick:
        grid, args.seeds = [1e-3, 1e-2, 1e-1], 1
    path = out_dir(args, "lr_transfer")
    clock = Clock()
    results = {}  # (task, optimizer) -> lr -> list of (metric, tiebreak) per seed
    tasks = [T(args.quick) for T in TASKS]
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        inf = lambda v: math.inf if v is None else v
        for r in saved["runs"]:
            results.setdefault((r["task"], r["optimizer"]), {})[r["lr"]] = [(inf(m), inf(t)) for m, t in zip(r["metric"], r["tiebreak"])]
        grid = sorted({lr for by_lr in results.values() for lr in by_lr})
        args.seeds = len(next(iter(next(iter(results.values())).values())))
        seconds = saved["wall_seconds"]
    else:
        for task in tasks:
            for name in task.optimizers:
                for lr in grid:
                    runs = [task.run(name, lr, seed) for seed in range(args.seeds)]
                    results.setdefault((task.name, name), {})[lr] = runs
                    m, sd, _ = stats(runs)
                    print(f"{task.name:11s} {name:19s} lr {lr:<7g}: {task.metric} {m:.4g} +- {sd:.2g}  [{clock}]", flush=True)
        seconds = clock.seconds()
    best = {key: best_lr(by_lr) for key, by_lr in results.items()}

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4.4), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0][col]
        means = [stats(v)[0] for name in task.optimizers for v in results[(task.name, name)].values()]
        finite = [m for m in means if math.isfinite(m)]
        # Points beyond 150 times the best mean (a blown-up run) are drawn at the top, as triangles.
        cap = max([m for m in finite if m <= 150 * min(finite)], default=1.0) * 1.15 if finite else 1.0
        log = task.name != "transformer"
        for k, name in enumerate(task.optimizers):
            color, fmt = STYLE[name]
            by_lr = results[(task.name, name)]
            shift = 1.0 + 0.07 * (k - 1)  # side by side, so that error bars do not hide each other
            pts = [(lr * shift, *stats(v)[:2]) for lr, v in by_lr.items()]
            ok = [q for q in pts if q[1] <= cap]
            # on a log axis an error bar may not reach below zero: clip its lower half
            low = [min(q[2], 0.9 * q[1]) if log else q[2] for q in ok]
            ax.errorbar([q[0] for q in ok], [q[1] for q in ok], yerr=[low, [q[2] for q in ok]], fmt=fmt, ms=4, capsize=2, color=color, label=name)
            high = [q[0] for q in pts if cap < q[1] < math.inf]
            ax.plot(high, [cap] * len(high), "^", color=color, ms=8)
            bad = [q[0] for q in pts if not math.isfinite(q[1])]
            ax.plot(bad, [cap] * len(bad), "x", color=color, ms=8)
            b = best[(task.name, name)]
            if math.isfinite(stats(by_lr[b])[0]):
                ax.plot([b * shift], [stats(by_lr[b])[0]], "*", color=color, ms=15, mec="k")
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(finite, default=0.1) / 1.5, cap * 1.6)
        else:
            ax.set_ylim(top=cap * 1.05)
        ax.axvline(0.01, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(task.metric)
        ax.set_title(f"{task.name} ({task.steps} steps)")
        ax.legend(fontsize=7)
    fig.suptitle(f"Best learning rate per task (star); mean +- std over {args.seeds} seed(s); at the top: x diverged, ^ off the scale; dotted: lr 0.01")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "lr_transfer.png"), dpi=90)
    plt.close(fig)

    lines = [
        "Learning-rate transfer (paper Figure 4) at toy scale.",
        f"command: {command('lr_transfer.py', argv)}",
        "protocol (here | the authors'):",
        "  tasks: MLP on digits; small ResNet (BatchNorm, skips) on digits; 2-layer char Transformer on the text scikit-learn "
        "ships; MLP GAN on a 2-D ring of 8 Gaussians | CIFAR-10 ResNet-18, ImageNet ResNet-50, class-conditional GAN, "
        "Transformer on Wikitext-2",
        "  steps: " + ", ".join(f"{t.name} {t.steps}" for t in tasks) + " | full training runs",
        f"  lr grid {grid[0]:g}..{grid[-1]:g} ({len(grid)} points), constant lr; {args.seeds} seed(s) | a grid per task, their schedules",
        "  Fromage with p_bound 1.0 on the ResNet (the paper's CIFAR setting; also run without), none elsewhere;",
        "  SGD with momentum 0.9; Adam with torch's defaults",
        "results: best lr (metric mean +- std over seeds); near-best = lrs whose mean is within the best's mean + its std:",
    ]
    for task in tasks:
        for name in task.optimizers:
            by_lr = results[(task.name, name)]
            b = best[(task.name, name)]
            m, sd, _ = stats(by_lr[b])
            near = [lr for lr, v in by_lr.items() if stats(v)[0] <= m + sd]
            lines.append(f"  {task.name:11s} {name:19s}: best lr {b:<7g} ({task.metric} {m:.4g} +- {sd:.2g}); near-best {near}")
    # Spreads in steps of the grid (half decades): the grid's rounded values would make equal
    # spreads differ in the fourth digit.
    spread = {}
    lines.append("best lr by task:        " + "".join(f"{t.name:>12s}" for t in tasks) + "   spread (decades)")
    rows = [(name, [best[(t.name, name)] for t in tasks]) for name in OPTIMIZER_NAMES]
    rows.append(("Fromage, no p_bound", [best[(t.name, "Fromage, no p_bound" if t.name == "resnet" else "Fromage")] for t in tasks]))
    for name, lrs in rows:
        steps = [grid.index(lr) for lr in lrs]
        spread[name] = (max(steps) - min(steps)) * math.log10(grid[-1] / grid[0]) / (len(grid) - 1)
        lines.append(f"  {name:20s} " + "".join(f"{lr:>12g}" for lr in lrs) + f"   {spread[name]:.1f}")
    fromage = sorted({best[(t.name, "Fromage")] for t in tasks})
    f, sgd, adam = spread["Fromage"], spread["SGD"], spread["Adam"]
    moved = f"SGD's moves over {sgd:.1f} decades ({min(rows[0][1]):g} to {max(rows[0][1]):g}), Adam's over {adam:.1f} ({min(rows[1][1]):g} to {max(rows[1][1]):g})"
    if fromage == [0.01] and f < min(sgd, adam):
        verdict = f"the paper's claim holds here: Fromage's best lr is 0.01 on every task, while {moved}"
    elif f < max(sgd, adam):
        verdict = (f"in part: Fromage's best lr stays within {f:.1f} decades ({fromage[0]:g} to {fromage[-1]:g}) on every task; "
                   f"{moved}" + ("" if f < min(sgd, adam) else ", so one of them transfers as well as Fromage here"))
    else:
        verdict = f"not reproduced here: Fromage's best lr moves over {f:.1f} decades ({fromage[0]:g} to {fromage[-1]:g}); {moved}"
    lines.append(f"verdict (Fromage as the paper ran it, p_bound on the ResNet): {verdict}.")
    rebuilt = f"; plot and summary rebuilt from {args.from_json}" if args.from_json else ""
    lines.append(f"wall time {seconds:.0f} s on {torch.get_num_threads()} CPU thread(s){', --quick' if args.quick else ''}{rebuilt}")
    with open(os.path.join(path, "results.json"), "w") as f:
        none = lambda v: v if math.isfinite(v) else None
        json.dump({"wall_seconds": round(seconds, 1),
                   "runs": [{"task": t, "optimizer": n, "lr": lr, "metric": [none(r[0]) for r in runs], "tiebreak": [none(r[1]) for r in runs]}
                            for (t, n), by_lr in results.items() for lr, runs in by_lr.items()]}, f, indent=1)
    write_summary(path, lines)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
