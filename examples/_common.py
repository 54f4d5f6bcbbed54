"""What the experiment scripts share: arguments and output folders, the digits data, the authors'
MLP, optimizers by name, minibatch streams and the summary file."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Iterator, List, Optional

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from fromage_fused import Fromage  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: The authors' MNIST runs: 60,000 images in batches of 250. Learning-rate schedules and
#: "per epoch" measurements here count epochs in the authors' steps, not in passes over digits.
AUTHORS_EPOCH = 240
COLORS = {"SGD": "tab:blue", "Adam": "tab:orange", "Fromage": "tab:green", "LARS": "tab:red"}


def make_optimizer(name: str, params, lr: float, *, p_bound: Optional[float] = None):
    """The optimizers compared: SGD with momentum 0.9 (the authors' baseline), Adam with torch's
    defaults, Fromage, and LARS = Fromage without the 1/sqrt(1+lr^2) prefactor (paper eq. 5)."""
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "Fromage":
        return Fromage(params, lr=lr, p_bound=p_bound)
    if name == "LARS":
        return Fromage(params, lr=lr, p_bound=p_bound, prefactor=False)
    raise ValueError(f"unknown optimizer {name!r}")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=None,
                   help="output folder (default: examples/out/<experiment>, which git ignores; "
                        "the committed results were written with --out examples/results/<experiment>)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run with tiny settings (for the tests)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def out_dir(args: argparse.Namespace, name: str) -> str:
    path = args.out or os.path.join(HERE, "out", name)
    os.makedirs(path, exist_ok=True)
    torch.set_num_threads(args.threads)
    return path


def command(script: str, argv) -> str:
    """The command line that reproduces a run, for its summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"examples/{script}"] + args)


def digits(seed: int = 0, flat: bool = True):
    """scikit-learn's 8x8 digits (1797 images, 10 classes): an 80/20 split, standardised on the
    train part. ``flat=False`` keeps the images as ``[N, 1, 8, 8]``."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    train, test = perm[:cut], perm[cut:]
    mean, scale = x[train].mean(0), x[train].std()
    x = (x - mean) / scale
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    return x[train], y[train], x[test], y[test]


def batches(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches from passes over ``n`` examples, each pass freshly shuffled (a DataLoader with
    shuffle=True whose passes run into each other, so every batch is full)."""
    gen = torch.Generator().manual_seed(seed)
    pending = torch.zeros(0, dtype=torch.long)
    while True:
        while len(pending) < batch:
            pending = torch.cat([pending, torch.randperm(n, generator=gen)])
        yield pending[:batch]
        pending = pending[batch:]


def authors_mlp(hidden: int, width: int, *, inputs: int = 64, classes: int = 10, bias: bool = True,
                init: str = "default", seed: int = 0) -> torch.nn.Sequential:
    """The authors' depth-study network: ``hidden`` layers ``Linear -> ReLU`` of width ``width``
    (the first maps the 64 input pixels to ``width``), then a final ``Linear`` to the classes; no
    batch norm, no skips. ``init="default"`` keeps PyTorch's initialisation (the authors');
    ``"he"`` draws He-normal weights and zero biases (an ablation)."""
    torch.manual_seed(seed)
    sizes = [inputs] + [width] * hidden
    layers: List[torch.nn.Module] = []
    for i in range(hidden):
        layers += [torch.nn.Linear(sizes[i], sizes[i + 1], bias=bias), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, classes, bias=bias))
    if init == "he":
        for m in layers:
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu" if m is not layers[-1] else "linear")
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
    elif init != "default":
        raise ValueError(f"unknown init {init!r}")
    return torch.nn.Sequential(*layers)


def linear_weights(net: torch.nn.Module) -> List[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear)]


def decay_every(opt, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["lr"] * factor


def write_summary(path: str, lines: List[str]) -> None:
    with open(os.path.join(path, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self):
        return f"{self.seconds():.0f} s"


def log_grid(lo: float, hi: float, n: int) -> List[float]:
    return [float(f"{v:.3g}") for v in np.logspace(math.log10(lo), math.log10(hi), n)]


OPTIMIZER_NAMES = ["SGD", "Adam", "Fromage"]
