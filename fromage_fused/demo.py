"""Train a small MLP on scikit-learn's digits (shipped with the package) with Fromage, lr 0.01.

    python -m fromage_fused.demo [--epochs N] [--backend NAME] [--p-bound X]

Needs scikit-learn: ``pip install scikit-learn`` (what the ``[examples]`` extra installs).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import Fromage, available_backends


def load_digits(device="cpu"):
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise SystemExit("the demo trains on scikit-learn's digits: pip install scikit-learn "
                         "(what the [examples] extra installs)") from None

    data = _load()
    x = torch.tensor(data.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(data.target, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen).to(device)
    x, y = x[perm], y[perm]
    split = int(0.8 * len(y))
    return (x[:split], y[:split]), (x[split:], y[split:])


def mlp(depth=3, width=128):
    layers, fan_in = [], 64
    for _ in range(depth - 1):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--p-bound", type=float, default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = load_digits(args.device)
    model = mlp().to(args.device)
    opt = Fromage(model.parameters(), lr=args.lr, p_bound=args.p_bound, backend=args.backend)
    (used,) = opt.backends().values()  # what "auto" chose for the model's one device
    print(f"fromage_fused on {args.device}; backends here: {available_backends(args.device)}; using {used}")
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in torch.randperm(len(ytr), device=args.device).split(64):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            train_loss = loss_fn(model(xtr), ytr).item()
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch:3d}  train loss {train_loss:.4f}  test accuracy {acc:.3f}  "
              f"({time.perf_counter() - start:.1f}s)")
    return acc


if __name__ == "__main__":
    main()
