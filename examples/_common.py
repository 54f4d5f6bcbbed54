"""What the experiment scripts share: arguments and output folders, the digits data, the authors'
MLP, optimizers by name, minibatch streams, the record of finished runs with their provenance, and
the summary file."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import zlib
from typing import Callable, Dict, Iterator, List, Optional

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


def make_optimizer(name: str, params, lr: float, *, p_bound: Optional[float] = None, momentum: float = 0.0,
                   beta1: float = 0.9):
    """The optimizers compared: SGD (plain by default, as the authors' CIFAR, GAN and Transformer
    baselines; their depth study used momentum 0.9), Adam (torch's defaults but for beta1, which the
    authors set to 0 for their GAN), Fromage, and LARS = Fromage without the 1/sqrt(1+lr^2)
    prefactor (paper eq. 5)."""
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr, betas=(float(beta1), 0.999))
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


ROOT = os.path.dirname(HERE)


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_state(script: str) -> Dict[str, object]:
    """The commit of the code that runs, and whether the files that decide a result (every example
    script, since they import one another, and the package) differ from it. Results are data, not code: they
    do not count."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    paths = ["examples/*.py", "fromage_fused"]  # every script: lr_transfer runs table1's tasks
    status = _git("status", "--porcelain", "--", *paths)
    return {"commit": commit, "dirty": bool(status)}


class Runs:
    """The runs of an experiment, one JSON record a line in ``runs.jsonl`` of its output folder.

    Each finished run is appended as soon as it ends, with its settings (the key), its results,
    its wall time and its provenance (the commit and command that wrote it, and the seed, which
    is part of the key), so an interrupted experiment resumes where it stopped and a summary can
    be rebuilt from the records alone. ``fresh`` starts the file anew; ``report_only`` runs
    nothing and fails on a missing record. Writing into ``examples/results`` needs a clean tree,
    so that every committed record names the code that wrote it."""

    def __init__(self, folder: str, script: str, argv, *, fresh: bool = False, report_only: bool = False,
                 shard: Optional[str] = None):
        self.path = os.path.join(folder, "runs.jsonl")
        self.report_only = report_only
        self.claims = os.path.join(folder, "claims") if shard == "any" else None
        self.shard = tuple(int(v) for v in shard.split("/")) if shard and shard != "any" else None
        self.waiting = False  # a run or a dependent phase was left to another process
        self.records: Dict[str, dict] = {}
        self.used: List[dict] = []
        self.state = code_state(script)
        self.command = command(script, argv)
        results = os.path.realpath(os.path.join(HERE, "results"))
        if (not report_only and self.state["dirty"]
                and os.path.realpath(folder).startswith(results + os.sep)
                and not os.environ.get("FROMAGE_EXAMPLES_ALLOW_DIRTY")):
            raise SystemExit(f"refusing to write into {folder}: examples/{script}, examples/_*.py or fromage_fused "
                             "differ from the commit; commit first, so that the records name the code that wrote them")
        if fresh and not report_only and os.path.exists(self.path):
            os.remove(self.path)
        self._load()

    def _load(self) -> None:
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    if line.strip():
                        rec = json.loads(line)
                        self.records[rec["key"]] = rec

    def _claim(self, key: str) -> bool:
        """Take the run of this key unless a live process has: an exclusively created file named
        after the key holds the claimant's pid."""
        os.makedirs(self.claims, exist_ok=True)
        path = os.path.join(self.claims, f"{zlib.crc32(key.encode()):08x}-{len(key)}")
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(path) as f:
                        pid = int(f.read() or 0)
                    os.kill(pid, 0)
                    return pid == os.getpid()
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    try:
                        os.remove(path)  # its claimant died: take it over
                    except FileNotFoundError:
                        pass
                    continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def finish_shard(self, label) -> None:
        """End a sharded call: exit status 3 while runs are left to others (a shell loop calls it
        again), 0 once every run it asked for is on file."""
        print(f"shard {label}: " + ("runs are left to other processes or wait for them; call again" if self.waiting
                                    else "every run is on file; a call without --shard writes the summary"), flush=True)
        raise SystemExit(3 if self.waiting else 0)

    @staticmethod
    def key(settings: dict) -> str:
        return json.dumps(settings, sort_keys=True)

    def get(self, settings: dict, run: Callable[[], dict]) -> Optional[dict]:
        """The record of these settings: the one on file, or a new run appended to the file; None
        for a run that belongs to another shard."""
        key = self.key(settings)
        rec = self.records.get(key)
        if rec is None and self.shard and zlib.crc32(key.encode()) % self.shard[1] != self.shard[0]:
            self.waiting = True
            return None
        if rec is None and self.claims:
            if not self._claim(key):
                self.waiting = True
                return None
            # A claim left by a process that has ended may hide a run it finished after this one
            # read the file: read it again rather than run it twice.
            self._load()
            rec = self.records.get(key)
        if rec is None:
            if self.report_only:
                raise SystemExit(f"--report-only: no record in {self.path} for {key}")
            start, cpu = time.perf_counter(), time.process_time()
            result = run()
            rec = {"key": key, **settings, "result": result, "seconds": round(time.perf_counter() - start, 2),
                   "cpu_seconds": round(time.process_time() - cpu, 2),
                   "commit": self.state["commit"], "dirty": self.state["dirty"], "command": self.command,
                   "threads": torch.get_num_threads(), "torch": torch.__version__}
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, allow_nan=False, default=_json_number) + "\n")
            self.records[key] = rec
        self.used.append(rec)
        return rec

    def provenance(self) -> List[str]:
        """Summary lines computed from the records used (so a rebuilt summary is the same), and
        last the command that wrote the summary (with --report-only it rebuilds it)."""
        commits = sorted({(r["commit"], r["dirty"]) for r in self.used}, key=str)
        commands = sorted({r["command"] for r in self.used})
        seeds = sorted({r["seed"] for r in self.used if "seed" in r})
        torches = sorted({r.get("torch", "?") for r in self.used})
        seconds = sum(r["seconds"] for r in self.used)
        timed = [r["cpu_seconds"] for r in self.used if "cpu_seconds" in r]

        def state(d):
            return "clean" if d is False else ("with uncommitted changes" if d else "state unknown")

        return [
            "provenance: " + "; ".join(f"commit {c} ({state(d)})" for c, d in commits),
            "  command: " + " | ".join(commands),
            f"  seeds: {', '.join(str(s) for s in seeds) or 'n/a'}; torch {', '.join(torches)}",
            f"  wall time: {seconds:.0f} s summed over the {len(self.used)} runs ({seconds / 3600:.2f} h; one thread "
            "each, niced, on a shared 2-core machine)"
            + (f"; CPU time {sum(timed):.0f} s ({sum(timed) / 3600:.2f} h) over the {len(timed)} runs that recorded it"
               if timed else ""),
            f"this summary: {self.command}",
        ]


def _json_number(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    raise TypeError(f"not JSON: {type(v).__name__}")


def finite_or_none(v: float) -> Optional[float]:
    """JSON has no inf/NaN: a diverged value is written as null."""
    return v if v is not None and math.isfinite(v) else None


def add_provenance_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fresh", action="store_true", help="start the output folder's runs.jsonl anew")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: rebuild the plot and summary from the output folder's runs.jsonl")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only the K-th of N shares of the independent runs (processes K = 0..N-1 side by side, "
                        "appending to the same runs.jsonl), or with 'any' every run no other live process has claimed; "
                        "exits 3 while runs are left to others (call it again), 0 when all are on file; a later call "
                        "without --shard writes the summary")


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


def save_figure(fig, path: str) -> None:
    """PNG without a timestamp in its metadata, so the same data give the same file."""
    fig.savefig(path, dpi=90, metadata={"Software": None})


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
