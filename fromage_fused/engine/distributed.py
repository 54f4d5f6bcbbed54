"""DTensor parameters: FSDP2 (``fully_shard``), tensor parallel, hybrid sharding.

Each rank holds only a shard of a DTensor parameter, but a rule's per-tensor sums must be those of
the whole tensor. Every pass runs on the local shards; the per-tensor sums a pass reduces are sums
over elements, so partial sums over disjoint shards add up: those of every tensor that shares a
mesh and a set of sharded mesh dimensions are stacked and combined with ONE ``all_reduce(SUM)``
over those mesh dimensions per pass; replicated dimensions need no communication (every replica
already holds the same shard). The next pass then reads the whole tensors' sums, identical on
every rank. Uneven and empty shards need nothing special: an empty shard contributes zeros.

Plain tensors (DDP, single process) never come here. The groups made here are the same
:class:`~fromage_fused.engine.groups.Group` as any other, with ``reduce`` naming the process group
and the device type of its collectives; ``engine.execute`` issues the all-reduces.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed

from .groups import Group, group_tensors

__all__ = ["dtensor_type", "is_dtensor", "local_pairs", "local_groups", "all_reduce_sums", "sums_bytes_per_step",
           "refuse_flat_parameters", "refuse_stochastic_rounding"]


def dtensor_type():
    # A DTensor can exist only once its module is loaded; importing it here would add a second
    # to every ``import fromage_fused`` (and torch may be built without distributed support).
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def _sharded_dims(placements) -> Tuple[int, ...]:
    # Shard and _StridedShard both split the tensor; only Replicate and Partial do not.
    return tuple(d for d, pl in enumerate(placements) if not (pl.is_replicate() or pl.is_partial()))


def _local_pair(i: int, p, g) -> Tuple[torch.Tensor, torch.Tensor]:
    """The local shards of parameter ``i`` and of its gradient, laid out alike."""
    if any(pl.is_partial() for pl in p.placements):
        raise RuntimeError(f"parameter {i} is a DTensor with a Partial placement {p.placements}; "
                           "parameters must be Shard or Replicate")
    if not is_dtensor(g):
        raise RuntimeError(f"parameter {i} is a DTensor but its gradient is a {type(g).__name__}; "
                           "give it a DTensor gradient on the same mesh")
    if g.device_mesh != p.device_mesh:
        raise RuntimeError(f"parameter {i} and its gradient live on different device meshes "
                           f"({p.device_mesh} vs {g.device_mesh})")
    if tuple(g.placements) != tuple(p.placements):
        # A Partial gradient holds summands of the gradient, not a piece of it: the norms of the
        # local pieces would not add up to the norm of their sum, and the update needs the summed
        # gradient elementwise anyway. Redistributing to the parameter's layout costs the
        # reduce-scatter (or all-reduce) the update cannot do without; FSDP2 already delivers
        # gradients laid out like their parameters, so this collective does not run there.
        g = g.redistribute(p.device_mesh, p.placements)
    return p.to_local(), g.to_local()


def _process_group(mesh, dims: Tuple[int, ...]):
    """The process group spanning mesh dimensions ``dims`` (one collective for all of them).

    Several dimensions are flattened with torch's own ``DeviceMesh._flatten``, which caches the
    flattened mesh on the mesh it came from: the group lives exactly as long as its mesh, and a mesh
    built after ``destroy_process_group`` and a new ``init_process_group`` gets its own.
    """
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    names = mesh.mesh_dim_names
    if not names:
        raise RuntimeError(
            f"a DTensor parameter is sharded over mesh dimensions {dims} of a mesh without dimension names; "
            "name the mesh dimensions (init_device_mesh(..., mesh_dim_names=...)) so they can be flattened into "
            "one group"
        )
    sub = mesh if len(dims) == mesh.ndim else mesh[tuple(names[d] for d in dims)]
    return sub._flatten().get_group()


def all_reduce_sums(sums: List[torch.Tensor], process_group, device_type: str) -> List[torch.Tensor]:
    """Sum each ``[n_i, k]`` tensor of per-tensor sums over the ranks of ``process_group`` with one
    collective that runs on ``device_type`` (the mesh's)."""
    if not sums:
        return sums
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    flat = torch.cat([s.to(dtype).reshape(-1) for s in sums])
    home = flat.device
    if home.type != device_type:
        # Shards offloaded to the host (FSDP2 CPUOffloadPolicy) on a mesh whose collectives run on
        # an accelerator: the sums travel through the mesh's device.
        flat = flat.to(device_type)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=process_group)
    flat = flat.to(home)
    out, start = [], 0
    for s in sums:
        out.append(flat[start:start + s.numel()].view(s.shape).to(s.dtype))
        start += s.numel()
    return out


def sums_bytes_per_step(params: Sequence, rule) -> Dict[Tuple[str, Tuple[int, ...]], int]:
    """Bytes each rank contributes to the all-reduces of one step per (mesh, sharded dims): the
    rule's per-tensor sums of every pass, 4 bytes each (8 when a float64 tensor shares the
    collective), not counting the sums a pass reduces only under some flags (``Pass.summed``: LARS's
    for the monitor). Replicated: none."""
    per_tensor = sum(p.sums for p in rule.passes if not p.summed)
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
    return {k: per_tensor * n * width for k, (n, width) in counts.items()}


def refuse_flat_parameters(params: Sequence[torch.Tensor], title: str) -> None:
    for p in params:
        if getattr(p, "_is_flat_param", False):
            raise RuntimeError(
                f"{title} got an FSDP1 flat parameter: it holds a shard of many layers flattened together, so "
                "per-tensor norms do not exist there; shard the model with FSDP2 (torch.distributed.fsdp.fully_shard)"
            )


def refuse_stochastic_rounding(params: Sequence[torch.Tensor]) -> None:
    if any(p.dtype == torch.bfloat16 for p in params):
        raise RuntimeError(
            "stochastic_rounding is not supported for DTensor (FSDP2) parameters yet; "
            "keep fp32 master weights (FSDP2's MixedPrecisionPolicy) or turn it off for that group"
        )


def local_pairs(params: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The local shards of DTensor ``params`` (all with gradients) and of their gradients."""
    pairs = [_local_pair(i, p, p.grad) for i, p in enumerate(params)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def local_groups(
    rule,
    params: Sequence[torch.Tensor],
    local_p: Sequence[torch.Tensor],
    local_g: Sequence[torch.Tensor],
    backend_for: Callable[[torch.device], object],
    fallback: Callable[[], object],
    *,
    scalars: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
    buffers: Optional[Mapping[str, Sequence[torch.Tensor]]] = None,
) -> List[Group]:
    """Groups of the local shards ``local_p``, ``local_g`` (from :func:`local_pairs`) of DTensor
    ``params``, each with the process group over which its sums are partial (None for replicated
    tensors: their sums are whole). ``scalars``, ``buffers``: the state of each parameter (local
    shards for buffers). Validates everything before anything changes."""
    keys = {}
    for p in params:
        spec = (p.device_mesh, tuple(p.placements))
        if spec not in keys:
            dims = _sharded_dims(p.placements)
            keys[spec] = (_process_group(p.device_mesh, dims), p.device_mesh.device_type) if dims else None
    by_key: Dict[object, List[int]] = {}
    for i, p in enumerate(params):
        by_key.setdefault((keys[(p.device_mesh, tuple(p.placements))], local_p[i].device), []).append(i)
    groups = []
    for (reduce, _), members in by_key.items():
        pick = lambda entries: {name: [v[i] for i in members] for name, v in (entries or {}).items()}  # noqa: E731
        made = group_tensors(rule, [local_p[i] for i in members], [local_g[i] for i in members], backend_for, fallback,
                             scalars=pick(scalars), buffers=pick(buffers))
        for g in made:
            g.reduce = reduce
            g.indices = [members[j] for j in g.indices]
        groups += made
    return groups
