"""The networks that Table 1 and the learning-rate study share: a pre-activation ResNet for 8x8
digits, a character-level causal Transformer, the text it reads, and the random shifts that stand
in for the authors' random crops."""
from __future__ import annotations

from importlib import resources

import torch

F = torch.nn.functional


class PreActBlock(torch.nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus the input (a 1x1 conv of the
    activated input where the shape changes), as in the authors' CIFAR-10 PreActResNet-18."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = torch.nn.BatchNorm2d(cin)
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else torch.nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet(torch.nn.Module):
    """A stem conv, three pre-activation blocks (8x8 -> 4x4 -> 2x2; c, 2c, 4c channels), BN, ReLU,
    global average pooling and a linear classifier: PreActResNet-18's shape at digits' size."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        c = channels
        self.stem = torch.nn.Conv2d(1, c, 3, 1, 1, bias=False)
        self.blocks = torch.nn.Sequential(PreActBlock(c, c, 1), PreActBlock(c, 2 * c, 2), PreActBlock(2 * c, 4 * c, 2))
        self.bn = torch.nn.BatchNorm2d(4 * c)
        self.fc = torch.nn.Linear(4 * c, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(h.mean((2, 3)))


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each ``[1, 8, 8]`` image shifted by -1, 0 or 1 pixel in each direction (zero padding):
    the authors' CIFAR-10 random crop (4 of 32 pixels) at digits' scale (1 of 8)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    rows = torch.randint(3, (n,), generator=gen)[:, None] + torch.arange(h)
    cols = torch.randint(3, (n,), generator=gen)[:, None] + torch.arange(w)
    return padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def shipped_text() -> str:
    """The dataset descriptions inside scikit-learn's wheel (about 43 KB of English), in file-name order."""
    folder = resources.files("sklearn.datasets") / "descr"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".rst"))
    return "\n".join((folder / n).read_text(encoding="utf-8") for n in names)


class CharLM(torch.nn.Module):
    """Embedding + learnt positions, pre-norm causal Transformer encoder layers, a linear head."""

    def __init__(self, vocab: int, context: int, d: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(context, d))
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, idx):
        n = idx.shape[1]
        h = self.emb(idx) + self.pos[:n]
        return self.head(self.blocks(h, mask=self.mask[:n, :n], is_causal=True))


def char_ids(text: str):
    """(ids as a 1-D long tensor, vocabulary size)."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)
