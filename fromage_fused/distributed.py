"""Fromage over DTensor parameters (FSDP2, tensor parallel, hybrid sharding): what the collectives
cost. The mechanism (passes on local shards, one all-reduce of the per-tensor sums per mesh and
pass) is the engine's, ``engine/distributed.py``."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

from .engine.distributed import is_dtensor, sums_bytes_per_step
from .rules.fromage.rule import FROMAGE

__all__ = ["is_dtensor", "stats_bytes_per_step"]


def stats_bytes_per_step(params: Sequence) -> Dict[Tuple[str, Tuple[int, ...]], int]:
    """Bytes each rank contributes to the one all-reduce per (mesh, sharded dims) of a Fromage step:
    3 stats per tensor, 4 bytes each (8 when a float64 tensor shares the collective). Replicated: none."""
    return sums_bytes_per_step(params, FROMAGE)
