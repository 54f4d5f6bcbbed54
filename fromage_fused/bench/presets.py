"""Parameter-shape presets: the tensor lists of real architectures, generated from their configs.

Nothing is downloaded: each preset lists the shapes its architecture's ``named_parameters()``
would have. A GPU preset is the real size; its CPU variant keeps the tensor count (so the
per-tensor host work stays realistic) and shrinks the widths, so that it fits in a CPU run.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable, Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]

__all__ = ["Preset", "PRESETS", "QUICK", "select", "make_tensors", "offset_view", "numel"]


def resnet50(width: int = 64, classes: int = 1000) -> List[Shape]:
    """torchvision's resnet50: a 7x7 stem, bottleneck stages [3, 4, 6, 3], batch norms, fc."""
    shapes: List[Shape] = [(width, 3, 7, 7), (width,), (width,)]
    in_ch = width
    for stage, blocks in enumerate([3, 4, 6, 3]):
        mid = width * 2**stage
        out = mid * 4
        for block in range(blocks):
            shapes += [(mid, in_ch, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,), (out, mid, 1, 1), (out,),
                       (out,)]
            if block == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(classes, in_ch), (classes,)]


def gpt2(d: int, layers: int, vocab: int = 50257, ctx: int = 1024) -> List[Shape]:
    """GPT-2 (tied output embedding): per block two layer norms, fused qkv, projections, MLP 4d."""
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def decoder(d: int, layers: int, ff: int, kv: int, vocab: int) -> List[Shape]:
    """A Llama-style decoder (RMSNorm, grouped-query attention, SwiGLU, untied head)."""
    block = [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ff, d), (ff, d), (d, ff)]
    return [(vocab, d)] + block * layers + [(d,), (vocab, d)]


def vit(d: int, layers: int, patch: int = 16, image: int = 224, classes: int = 1000) -> List[Shape]:
    """ViT (timm's vit_base_patch16_224 layout): patch conv, cls token, position table, blocks, head."""
    tokens = (image // patch) ** 2 + 1
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [(1, 1, d), (1, tokens, d), (d, 3, patch, patch),
            (d,)] + block * layers + [(d,), (d,), (classes, d), (classes,)]


def many_small(count: int = 2048, largest: int = 65536) -> List[Shape]:
    """``count`` tensors of at most ``largest`` elements: biases, norms, small and odd matrices."""
    sizes = [largest, largest // 4 + 3, largest // 16, 1000, 257, 64, 3, 1]
    shapes: List[Shape] = []
    for i in range(count):
        n = max(1, sizes[i % len(sizes)])
        shapes.append((n // 64, 64) if i % 2 == 0 and n >= 64 else (n,))
    return shapes


def few_huge(count: int = 4, size: int = 256 * 2**20) -> List[Shape]:
    return [(size,)] * count


@dataclass(frozen=True)
class Preset:
    """A named shape list, full-size for GPUs and a narrower CPU variant."""

    name: str
    about: str
    full: Callable[[], List[Shape]]
    cpu: Callable[[], List[Shape]]

    def shapes(self, device: torch.device) -> List[Shape]:
        return self.full() if torch.device(device).type == "cuda" else self.cpu()

    def variant(self, device: torch.device) -> str:
        return "full" if torch.device(device).type == "cuda" else "cpu"


def _p(name, about, full, cpu):
    return Preset(name, about, full, cpu)


_ALL = [
    _p("resnet50", "ResNet-50, 25.6M params, 161 tensors (CPU: width/4)",
       lambda: resnet50(), lambda: resnet50(width=16)),
    _p("gpt2-small", "GPT-2 small, 124M params, 148 tensors (CPU: d=192, vocab/4, ctx 256)",
       lambda: gpt2(768, 12), lambda: gpt2(192, 12, vocab=12564, ctx=256)),
    _p("gpt2-medium", "GPT-2 medium, 355M params, 292 tensors (CPU: d=256, vocab/4, ctx 256)",
       lambda: gpt2(1024, 24), lambda: gpt2(256, 24, vocab=12564, ctx=256)),
    _p("decoder-1b", "1.1B Llama-style decoder (TinyLlama shapes), 201 tensors (CPU: widths/8)",
       lambda: decoder(2048, 22, ff=5632, kv=256, vocab=32000), lambda: decoder(256, 22, ff=704, kv=32, vocab=4000)),
    _p("vit-b16", "ViT-B/16, 86.6M params, 152 tensors (CPU: d=192)",
       lambda: vit(768, 12), lambda: vit(192, 12)),
    _p("many-small", "2048 tensors of <= 64K elements (CPU: <= 4K)",
       lambda: many_small(2048, 65536), lambda: many_small(2048, 4096)),
    _p("few-huge", "4 tensors of 256M elements (CPU: 4M)",
       lambda: few_huge(4, 256 * 2**20), lambda: few_huge(4, 4 * 2**20)),
    _p("host-overhead", "2048 tensors of 16 elements: the step is host work (read us_per_tensor)",
       lambda: [(16,)] * 2048, lambda: [(16,)] * 2048),
]

PRESETS: Dict[str, Preset] = {p.name: p for p in _ALL}

#: What ``--quick`` runs: on CPU a subset that finishes in about a minute on two cores; on a GPU
#: every preset (a GPU steps even the largest in milliseconds), with fewer repeats, and the one
#: that also runs torch.compile last, so that a time limit cuts the compile first.
QUICK = {"cpu": ["resnet50", "many-small", "host-overhead"],
         "cuda": ["resnet50", "vit-b16", "gpt2-medium", "decoder-1b", "many-small", "few-huge", "host-overhead",
                  "gpt2-small"]}


def select(names: Sequence[str]) -> List[Preset]:
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    return [PRESETS[n] for n in names]


def numel(shapes: Sequence[Shape]) -> int:
    return sum(prod(s) for s in shapes)


def offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` that starts ``offset`` elements into a buffer of its own (a view at that offset:
    16-byte aligned only when the offset is a multiple of 16 bytes)."""
    if not offset:
        return t
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def make_tensors(shapes: Sequence[Shape], *, dtype: torch.dtype, device, seed: int,
                 misalign: Tuple[int, int] = (0, 0)) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Random parameters (scale 0.02, like common inits) and gradients (scale 1e-3) of ``shapes``;
    with ``misalign=(P, G)`` each parameter starts P elements and each gradient G elements into its
    buffer (views, as parameters carved out of flat buffers are)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [offset_view(torch.randn(s, generator=gen, device=device, dtype=dtype).mul_(0.02), misalign[0])
              for s in shapes]
    grads = [offset_view(torch.randn(s, generator=gen, device=device, dtype=dtype).mul_(1e-3), misalign[1])
             for s in shapes]
    return params, grads
