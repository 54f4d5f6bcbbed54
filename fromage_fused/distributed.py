"""Fromage over DTensor parameters: FSDP2 (``fully_shard``), tensor parallel, hybrid sharding.

Each rank holds only a shard of a DTensor parameter, but Fromage needs the norms of the whole
tensor. The stats phase runs the backend on the local shards; the ``[n, 3]`` partial sums
(``||p||^2``, ``||g||^2``, ``<p, g>`` are sums over elements, so partial sums over disjoint shards
add up) of every tensor that shares a mesh and a set of sharded mesh dimensions are stacked and
combined with ONE ``all_reduce(SUM)`` over those mesh dimensions; replicated dimensions need no
communication (every replica already holds the same shard). The apply phase then runs on the local
shards with the full tensors' stats, so ``max_norm`` is the full tensor's norm, identical on every
rank. Uneven and empty shards need nothing special: an empty shard contributes zeros.

Plain tensors (DDP, single process) never come here.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed

from .backends import Backend
from .functional import Group, plan, run_apply, run_stats

__all__ = ["is_dtensor", "ShardedStep", "stats_bytes_per_step"]


def _dtensor_type():
    # A DTensor can exist only once its module is loaded; importing it here would add a second
    # to every ``import fromage_fused`` (and torch may be built without distributed support).
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _sharded_dims(placements) -> Tuple[int, ...]:
    # Shard and _StridedShard both split the tensor; only Replicate and Partial do not.
    return tuple(d for d, pl in enumerate(placements) if not (pl.is_replicate() or pl.is_partial()))


def _local_pair(i: int, p, g) -> Tuple[torch.Tensor, torch.Tensor]:
    """The local shards of parameter ``i`` and of its gradient, laid out alike."""
    if any(pl.is_partial() for pl in p.placements):
        raise RuntimeError(f"parameter {i} is a DTensor with a Partial placement {p.placements}; parameters must be Shard or Replicate")
    if not is_dtensor(g):
        raise RuntimeError(f"parameter {i} is a DTensor but its gradient is a {type(g).__name__}; give it a DTensor gradient on the same mesh")
    if g.device_mesh != p.device_mesh:
        raise RuntimeError(f"parameter {i} and its gradient live on different device meshes ({p.device_mesh} vs {g.device_mesh})")
    if tuple(g.placements) != tuple(p.placements):
        # A Partial gradient holds summands of the gradient, not a piece of it: the norms of the
        # local pieces would not add up to the norm of their sum, and the update needs the summed
        # gradient elementwise anyway. Redistributing to the parameter's layout costs the
        # reduce-scatter (or all-reduce) the update cannot do without; FSDP2 already delivers
        # gradients laid out like their parameters, so this collective does not run there.
        g = g.redistribute(p.device_mesh, p.placements)
    return p.to_local(), g.to_local()


_flat_groups: Dict[Tuple[object, Tuple[int, ...]], object] = {}


def _process_group(mesh, dims: Tuple[int, ...]):
    """The process group spanning mesh dimensions ``dims`` (one collective for all of them)."""
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    key = (mesh, dims)
    if key not in _flat_groups:
        names = mesh.mesh_dim_names
        if not names:
            raise RuntimeError(
                f"a DTensor parameter is sharded over mesh dimensions {dims} of a mesh without dimension names; "
                "name the mesh dimensions (init_device_mesh(..., mesh_dim_names=...)) so they can be flattened into one group"
            )
        sub = mesh if len(dims) == mesh.ndim else mesh[tuple(names[d] for d in dims)]
        _flat_groups[key] = sub._flatten().get_group()
    return _flat_groups[key]


def all_reduce_stats(stats: List[torch.Tensor], mesh, dims: Tuple[int, ...]) -> List[torch.Tensor]:
    """Sum each ``[n_i, 3]`` stats tensor over the ranks of ``dims`` with one collective."""
    if not dims or not stats:
        return stats
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in stats) else torch.float32
    flat = torch.cat([s.to(dtype).reshape(-1) for s in stats])
    home = flat.device
    if home.type != mesh.device_type:
        # Shards offloaded to the host (FSDP2 CPUOffloadPolicy) on a mesh whose collectives run on
        # an accelerator: the stats travel through the mesh's device.
        flat = flat.to(mesh.device_type)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=_process_group(mesh, dims))
    flat = flat.to(home)
    out, start = [], 0
    for s in stats:
        out.append(flat[start:start + s.numel()].view(s.shape).to(s.dtype))
        start += s.numel()
    return out


def stats_bytes_per_step(params: Sequence) -> Dict[Tuple[str, Tuple[int, ...]], int]:
    """Bytes each rank contributes to the one all-reduce per (mesh, sharded dims): 3 stats per
    tensor, 4 bytes each (8 when a float64 tensor shares the collective). Replicated: none."""
    counts: Dict[Tuple[str, Tuple[int, ...]], List[int]] = {}
    for p in params:
        if not is_dtensor(p):
            continue
        dims = _sharded_dims(p.placements)
        if dims:
            entry = counts.setdefault((str(p.device_mesh), dims), [0, 4])
            entry[0] += 1
            if p.dtype in (torch.float64, torch.complex128):
                entry[1] = 8
    return {k: 3 * n * width for k, (n, width) in counts.items()}


@dataclass
class _Bucket:
    """The DTensor parameters of one (mesh, sharded dims): one all-reduce per step."""

    mesh: object
    dims: Tuple[int, ...]
    # (param group, the groups planned over the local shards of its DTensor params)
    work: List[Tuple[dict, List[Group]]] = field(default_factory=list)


class ShardedStep:
    """Collects the DTensor parameters of a step, validates them, then steps them.

    ``take`` is called once per param group before anything changes (bad input raises there, and
    state is found or created there); ``step`` runs stats, one all-reduce per (mesh, sharded dims),
    and apply. ``backend_for(device)`` is the optimizer's backend for a device, ``max_norm(p)`` the
    state tensor of DTensor ``p``: the same the optimizer's plain tensors get.
    """

    def __init__(self, backend_for: Callable[[torch.device], Backend], max_norm: Callable[[torch.Tensor], torch.Tensor]):
        self.backend_for = backend_for
        self.max_norm = max_norm
        self.buckets: Dict[Tuple[object, Tuple[int, ...]], _Bucket] = {}

    def take(self, group: dict, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """Keep the DTensor parameters of ``params`` (which have gradients); return the others."""
        for p in params:
            if getattr(p, "_is_flat_param", False):
                raise RuntimeError(
                    "Fromage got an FSDP1 flat parameter: it holds a shard of many layers flattened together, so "
                    "per-tensor norms do not exist there; shard the model with FSDP2 (torch.distributed.fsdp.fully_shard)"
                )
        dtensor = _dtensor_type()
        if dtensor is None:
            return params
        plain = [p for p in params if not isinstance(p, dtensor)]
        if len(plain) == len(params):
            return params
        if group.get("stochastic_rounding") and any(is_dtensor(p) and p.dtype == torch.bfloat16 for p in params):
            raise RuntimeError(
                "stochastic_rounding is not supported for DTensor (FSDP2) parameters yet; "
                "keep fp32 master weights (FSDP2's MixedPrecisionPolicy) or turn it off for that group"
            )
        by_key: Dict[Tuple[object, Tuple[int, ...]], List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for i, p in enumerate(params):
            if is_dtensor(p):
                local_p, local_g = _local_pair(i, p, p.grad)
                by_key.setdefault((p.device_mesh, _sharded_dims(p.placements)), []).append((p, local_p, local_g))
        for key, entries in by_key.items():
            bucket = self.buckets.setdefault(key, _Bucket(*key))
            # Local shards may sit on another device than the mesh's (CPU offload).
            for device in dict.fromkeys(e[1].device for e in entries):
                here = [e for e in entries if e[1].device == device]
                groups = plan([e[1] for e in here], [e[2] for e in here], None, backend=self.backend_for(device))
                if group["p_bound"] is not None:
                    for g in groups:
                        g.max_norms = [self.max_norm(here[i][0]) for i in g.indices]
                bucket.work.append((group, groups))
        return plain

    def step(self, *, found_inf: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None) -> None:
        """Step every parameter taken."""
        for bucket in self.buckets.values():
            flat = [(pg, g) for pg, groups in bucket.work for g in groups]
            stats = [run_stats(g, inner=pg["p_bound"] is not None) for pg, g in flat]
            stats = all_reduce_stats(stats, bucket.mesh, bucket.dims)
            for (pg, g), s in zip(flat, stats):
                run_apply(
                    g, s, lr=pg["lr"], p_bound=pg["p_bound"], maximize=pg["maximize"],
                    prefactor=pg["prefactor"], found_inf=found_inf, grad_scale=grad_scale,
                )
