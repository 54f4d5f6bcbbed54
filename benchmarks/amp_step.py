"""An AMP optimizer step (GradScaler's inf check + the step + the scale update) with Fromage against
torch's AdamW under the same GradScaler, on the same tensors.

    python benchmarks/amp_step.py [--device cuda] [--params 25e6] [--backend auto] [--out results/amp_step.json]

Gradients are set once and the scaler's step/update cycle repeats on them, so only the
optimizer side is timed. Fromage and fused AdamW skip GradScaler's unscale pass (both set
``_step_supports_amp_scaling``); foreach AdamW pays for it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import torch

from fromage_fused import Fromage

# A transformer-like mix: large matrices, vectors (biases, norms), one embedding.
def shapes(total: int, width: int = 1024):
    out = [(4 * width, width)]  # embedding-like
    while sum(a * b for a, b in out) < total:
        out += [(width, width), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,), (width,)]
    return out


def make_params(total, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes(total):
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype))
        p.grad = torch.randn(s, generator=gen).to(device, dtype) * 1e3
        params.append(p)
    return params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_amp_step(opt, device, iters, repeats):
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16, growth_interval=10 ** 9)
    scaler.scale(torch.ones((), device=device))  # creates the scale on the device
    for _ in range(3):
        scaler.step(opt)
        scaler.update()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            scaler.step(opt)
            scaler.update()
        sync(device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--params", type=float, default=25e6 if torch.cuda.is_available() else 2e6)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    candidates = {
        f"fromage[{args.backend}]": lambda ps: Fromage(ps, lr=0.01, backend=args.backend),
        "adamw[fused]": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "adamw[foreach]": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    }
    rows = []
    for name, build in candidates.items():
        params = make_params(int(args.params), device, dtype)
        try:
            opt = build(params)
            seconds = time_amp_step(opt, device, args.iters, args.repeats)
        except (RuntimeError, ValueError) as exc:  # e.g. fused AdamW without a kernel for this device/dtype
            print(f"{name:16s} unavailable: {exc}")
            continue
        rows.append({"optimizer": name, "median_step_ms": seconds * 1e3})
        print(f"{name:16s} {seconds * 1e3:9.3f} ms per AMP step")
    n = sum(p.numel() for p in make_params(int(args.params), "cpu", dtype))
    record = {
        "what": "AMP step: GradScaler inf check + optimizer step + scale update",
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype, "numel": n,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": rows,
    }
    if args.out:
        path = pathlib.Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
