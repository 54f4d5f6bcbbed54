"""A class-conditional GAN on scikit-learn's digits, after the authors' CIFAR-10 GAN: spectral
normalisation in both nets, batch norm in the generator, a projection discriminator, the hinge
loss, one D step per G step, batch 256, lr divided by 10 at 100/120 of training, the same
optimizer and lr for both nets. It is scored, as the authors' FID scores theirs, by a Frechet
distance between generated and training images, here in the features of a digits classifier
trained once (the authors use Inception features), and by that classifier's accuracy on the
generated images for the labels they were generated for."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from sklearn.datasets import load_digits

from _common import batches, make_optimizer

F = torch.nn.functional
sn = torch.nn.utils.spectral_norm
Z, WIDTH, BATCH = 32, 128, 256
DECAY_AT = 100 / 120  # the authors' GAN: lr / 10 at epoch 100 of 120


def images(seed: int = 0):
    """Digits as 64 pixels in [-1, 1] (the authors' GAN normalises CIFAR-10 to [-1, 1]), split
    80/20 as everywhere in the examples: (x_train, y_train, x_test, y_test)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 8 - 1
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


class Generator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = sn(torch.nn.Embedding(10, Z))
        self.fc1, self.bn1 = sn(torch.nn.Linear(2 * Z, WIDTH)), torch.nn.BatchNorm1d(WIDTH)
        self.fc2, self.bn2 = sn(torch.nn.Linear(WIDTH, WIDTH)), torch.nn.BatchNorm1d(WIDTH)
        self.out = sn(torch.nn.Linear(WIDTH, 64))

    def forward(self, z, label):
        h = torch.cat([z, self.embed(label)], 1)
        h = F.relu(self.bn1(self.fc1(h)))
        h = F.relu(self.bn2(self.fc2(h)))
        return torch.tanh(self.out(h))


class Discriminator(torch.nn.Module):
    """Projection discriminator: ``linear(h) + <embed(label), h>`` on features ``h``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = sn(torch.nn.Linear(64, WIDTH)), sn(torch.nn.Linear(WIDTH, WIDTH))
        self.linear = sn(torch.nn.Linear(WIDTH, 1))
        self.embed = sn(torch.nn.Embedding(10, WIDTH))

    def forward(self, x, label):
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.linear(h).squeeze(1) + (self.embed(label) * h).sum(1)


def normalised_weights(net: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """The spectrally normalised layers' raw weights (``weight_orig``): the layer computes with
    ``weight_orig / sigma(weight_orig)``, so its output does not depend on their scale."""
    return {name: p for name, p in net.named_parameters() if name.endswith("weight_orig")}


class Scorer:
    """A digits classifier (MLP 64-128-64-10, Adam, 600 steps, fixed seed) trained once on the
    training split, its penultimate features, and the Frechet distance in them."""

    _instance: Optional["Scorer"] = None

    @classmethod
    def get(cls) -> "Scorer":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        x, y, xt, yt = images()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.features = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                                torch.nn.ReLU())
            self.head = torch.nn.Linear(64, 10)
        params = list(self.features.parameters()) + list(self.head.parameters())
        opt = torch.optim.Adam(params, lr=1e-3)
        stream = batches(len(x), 128, 0)
        for _ in range(600):
            idx = next(stream)
            loss = F.cross_entropy(self.head(self.features(x[idx])), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
        self.train_x, self.train_y = x, y
        self.train_feats = self.embed(x)
        self.test_accuracy = self.accuracy(xt, yt)
        self.train_test_distance = self.distance(self.embed(xt))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).double()

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return (self.head(self.features(x)).argmax(1) == y).float().mean().item()

    def distance(self, feats: torch.Tensor) -> float:
        """Frechet distance between Gaussians fitted to the training images' features and ``feats``:
        ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, in float64."""
        a, b = self.train_feats, feats
        mu_a, mu_b = a.mean(0), b.mean(0)
        cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
        values, vectors = torch.linalg.eigh(cov_a)
        root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
        cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
        return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def _score(scorer: Scorer, gen_net: Generator, y: torch.Tensor) -> Optional[tuple]:
    """(Frechet distance, accuracy) of one generated digit per training label, from fixed noise;
    None if the samples are not finite. The generator runs in eval mode (BN's running statistics)."""
    was_training = gen_net.training
    gen_net.eval()
    with torch.no_grad():
        fake = gen_net(torch.randn(len(y), Z, generator=torch.Generator().manual_seed(1234)), y)
    gen_net.train(was_training)
    if not torch.isfinite(fake).all():
        return None
    return scorer.distance(scorer.embed(fake)), scorer.accuracy(fake, y)


def train_gan(opt_name: str, lr: float, seed: int, steps: int, *, beta1: float = 0.0, norms_every: int = 0,
              score_every: int = 0) -> dict:
    """Train one GAN; its Frechet distance and classifier accuracy (inf and 0 if it diverged);
    every ``norms_every`` steps, the norm of each spectrally normalised layer's weight_orig, and
    every ``score_every`` steps, the distance and accuracy so far."""
    scorer = Scorer.get()
    x, y = scorer.train_x, scorer.train_y
    torch.manual_seed(seed)
    gen_net, disc = Generator(), Discriminator()
    opt_g = make_optimizer(opt_name, gen_net.parameters(), lr, beta1=beta1)
    opt_d = make_optimizer(opt_name, disc.parameters(), lr, beta1=beta1)
    stream = batches(len(x), BATCH, seed)
    noise = torch.Generator().manual_seed(seed)
    layers = {**{f"G.{k}": v for k, v in normalised_weights(gen_net).items()},
              **{f"D.{k}": v for k, v in normalised_weights(disc).items()}}
    trace: Dict[str, List[float]] = {"step": [], **{k: [] for k in layers}}

    scores: Dict[str, list] = {"step": [], "distance": [], "accuracy": []}

    def record(step):
        trace["step"].append(step)
        for k, p in layers.items():
            trace[k].append(p.detach().double().norm().item())

    def record_score(step):
        got = _score(scorer, gen_net, y)
        scores["step"].append(step)
        scores["distance"].append(None if got is None else got[0])
        scores["accuracy"].append(None if got is None else got[1])

    diverged = None
    for step in range(steps):
        if norms_every and step % norms_every == 0:
            record(step)
        if score_every and step and step % score_every == 0:
            record_score(step)
        if step == int(steps * DECAY_AT):
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"] = group["lr"] / 10
        idx = next(stream)
        real, label = x[idx], y[idx]
        z = torch.randn(BATCH, Z, generator=noise)
        d_loss = F.relu(1 + disc(gen_net(z, label).detach(), label)).mean() + F.relu(1 - disc(real, label)).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = -disc(gen_net(z, label), label).mean()
        if not (torch.isfinite(d_loss) and torch.isfinite(g_loss)):
            diverged = step
            break
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    if norms_every and diverged is None:
        record(steps)
    result = {"distance": math.inf, "accuracy": 0.0, "diverged_at": diverged}
    if diverged is None:
        got = _score(scorer, gen_net, y)
        if got is not None:
            result = {"distance": got[0], "accuracy": got[1], "diverged_at": None}
            if score_every:
                record_score(steps)
    if norms_every:
        result["norms"] = trace
    if score_every:
        result["scores"] = scores
    return result
