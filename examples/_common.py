"""What the experiment scripts share: the digits data, plain MLPs, optimizers by name, a training loop."""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Callable, Dict, List

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from fromage_fused import Fromage  # noqa: E402

OPTIMIZERS: Dict[str, Callable] = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "Fromage": lambda params, lr: Fromage(params, lr=lr),
}
COLORS = {"SGD": "tab:blue", "Adam": "tab:orange", "Fromage": "tab:green", "LARS": "tab:red"}


def parse_args(description: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=None, help="output directory (default: examples/results/<script>)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long run with tiny settings (for tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=["kaiming", "default"], default="kaiming", help="weight initialisation of the MLPs")
    return parser.parse_args(argv)


def out_dir(args: argparse.Namespace, name: str) -> str:
    if args.init != "kaiming":
        name += f"-{args.init}-init"
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    os.makedirs(path, exist_ok=True)
    torch.set_num_threads(args.threads)
    return path


def digits(seed: int = 0):
    """scikit-learn's 8x8 digits (1797 images, 10 classes): an 80/20 split, standardised on the train part."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = perm[:cut], perm[cut:]
    mean, scale = x[train].mean(0), x[train].std()
    x = (x - mean) / scale
    return x[train], y[train], x[test], y[test]


def mlp(depth: int, width: int, *, inputs: int = 64, classes: int = 10, batchnorm: bool = False, seed: int = 0,
        init: str = "kaiming") -> torch.nn.Sequential:
    """``depth`` linear layers without biases, ReLU between them.

    ``init="kaiming"``: He-normal weights (gain sqrt(2) before a ReLU, 1 for the last layer), which
    keep the signal's scale through depth; ``"default"``: PyTorch's own, whose signal shrinks by
    about sqrt(3) per ReLU layer.
    ``batchnorm=True`` follows every linear layer by a BatchNorm without affine parameters, which
    makes the loss invariant to the scale of each weight matrix.
    """
    torch.manual_seed(seed)
    sizes = [inputs] + [width] * (depth - 1) + [classes]
    layers: List[torch.nn.Module] = []
    for i in range(depth):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1], bias=False))
        if init == "kaiming":
            torch.nn.init.kaiming_normal_(layers[-1].weight, nonlinearity="relu" if i < depth - 1 else "linear")
        elif init != "default":
            raise ValueError(f"unknown init {init!r}")
        if batchnorm:
            layers.append(torch.nn.BatchNorm1d(sizes[i + 1], affine=False))
        if i < depth - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def weights(net: torch.nn.Module) -> List[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def evaluate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(loss, accuracy) on the whole set; a diverged net (non-finite output) counts as loss inf."""
    out = net(x)
    loss = torch.nn.functional.cross_entropy(out, y).item()
    acc = (out.argmax(1) == y).float().mean().item()
    if not math.isfinite(loss) or not torch.isfinite(out).all():
        return math.inf, acc
    return loss, acc


def train(net, opt, x, y, *, steps: int, batch: int = 128, seed: int = 0, every: int = 0, hook=None):
    """Minibatch training for ``steps`` steps; stops early once the loss is not finite.

    ``hook(step, net)`` runs every ``every`` steps (and at step 0) if given.
    """
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for step in range(steps):
        if hook is not None and every and step % every == 0:
            hook(step, net)
        idx = torch.randint(len(x), (batch,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        if not torch.isfinite(loss):
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if hook is not None and every:
        hook(steps, net)
    return True


def write_summary(path: str, lines: List[str], args: argparse.Namespace) -> None:
    lines = lines + [f"init {args.init}, seed {args.seed}{', --quick' if args.quick else ''}"]
    with open(os.path.join(path, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def __str__(self):
        return f"{time.perf_counter() - self.start:.0f} s"


def log_grid(lo: float, hi: float, n: int) -> List[float]:
    return [float(v) for v in np.logspace(math.log10(lo), math.log10(hi), n)]
