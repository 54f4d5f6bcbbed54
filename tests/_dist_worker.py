"""What each rank of the multi-process tests runs (CPU, gloo), and the single-process runs they
are compared with. One process group per world size serves every check, so each world size
starts its processes once; each rank saves its results to ``<outdir>/r<rank>.pt``.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.nn.functional as F
from torch import nn

from fromage_fused import LARS, Fromage
from fromage_fused.rules.lamb import LAMB
from fromage_fused.distributed import stats_bytes_per_step
from _host_reads import forbid_host_reads

STEPS = 10
LR = 0.05
P_BOUND = 1.0
BATCH = 8


class Net(nn.Module):
    """Shapes chosen for sharding over 2 and 4 ranks: 7 rows split unevenly, 3 rows leave a rank
    an empty shard, a 1-element tensor, and a zero-initialised bias (stays zero under p_bound)."""

    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(5, 7)
        self.l2 = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.ones(1))
        self.shift = nn.Parameter(torch.zeros(3))
        with torch.no_grad():
            for p in (self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias):
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))) * self.scale + self.shift


def optimizer(model, backend):
    """Two param groups with different lr: their sharded stats still share one all-reduce."""
    first = list(model.l1.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return Fromage([{"params": first}, {"params": rest, "lr": LR / 2}], lr=LR, p_bound=P_BOUND, backend=backend)


def lars_optimizer(model, backend):
    """LARS adapting the first layer (weight decay) and not the rest: one group's norms, one all-reduce."""
    first = list(model.l1.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return LARS([{"params": first}, {"params": rest, "weight_decay": 0.0, "lr": 0.02}], lr=0.5, momentum=0.9,
                weight_decay=1e-2, trust_coeff=0.02, backend=backend)


def lars_monitored_optimizer(model, backend):
    """``lars_optimizer`` with per-layer monitoring: the update's ‖u‖² is one more all-reduce."""
    opt = lars_optimizer(model, backend)
    opt.monitor = True
    return opt


def last_relative_change(opt):
    return torch.cat([s.relative_change for s in opt.last_stats()]) if opt.monitor else None


def lamb_optimizer(model, backend):
    """LAMB with caution and its global gradient clipping (a value the gradients exceed), adapting the
    first layer and not the rest."""
    first = list(model.l1.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return LAMB([{"params": first}, {"params": rest, "weight_decay": 0.0}], lr=0.02, weight_decay=0.1, caution=True,
                max_grad_norm=0.05, backend=backend)


def batch(step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 3, generator=gen)


def train(model, opt, steps, first=0, rank=0, world=1, on_step=None):
    """Each rank takes its equal slice of the batch; the mean over ranks equals the full batch's."""
    for t in range(first, first + steps):
        x, y = batch(t)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        opt.zero_grad()
        F.mse_loss(model(x[rows]), y[rows]).backward()
        if on_step is None:
            opt.step()
        else:
            on_step(opt)


def single_process(backend: str, steps: int = STEPS, seed: int = 0, make=optimizer):
    """The run every distributed run must reproduce: same model, same data, one process."""
    model = Net(seed)
    opt = make(model, backend)
    train(model, opt, steps)
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if opt.monitor:
        out["relative_change"] = last_relative_change(opt)
    return out


def _full(model):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}




def _counted_step(counts, guard=False):
    """Step under CommDebugMode, recording the collectives it issued (and, with ``guard``,
    refusing host reads)."""
    from torch.distributed.tensor.debug import CommDebugMode

    def step(opt):
        with CommDebugMode() as mode, (forbid_host_reads() if guard else contextlib.nullcontext()):
            opt.step()
        counts.append({str(k): v for k, v in mode.get_comm_counts().items()})

    return step


def _fsdp(mesh, seed=0):
    from torch.distributed.fsdp import fully_shard

    model = Net(seed)
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model.l2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_fsdp(mesh, backend, rank, world, make=optimizer):
    model = _fsdp(mesh)
    counts = []
    opt = make(model, backend)
    train(model, opt, STEPS, rank=rank, world=world, on_step=_counted_step(counts, guard=True))
    return {"params": _full(model), "comm_counts": counts,
            "stats_bytes": stats_bytes_per_step(list(model.parameters())), "relative_change": last_relative_change(opt)}


def check_ddp(backend, rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net(0)
    ddp = DDP(model)
    counts = []
    train(ddp, optimizer(model, backend), STEPS, rank=rank, world=world,
          on_step=_counted_step(counts))
    return {"params": _full(model), "comm_counts": counts}


def check_dcp(mesh, backend, rank, world, directory):
    """Save mid-training, go on; load into a differently initialised model and optimizer, go on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = STEPS // 2
    model = _fsdp(mesh)
    opt = optimizer(model, backend)
    train(model, opt, half, rank=rank, world=world)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=directory)
    saved_max = [opt.state[p]["max_norm"].clone() for p in model.parameters()]
    train(model, opt, half, first=half, rank=rank, world=world)

    other = _fsdp(mesh, seed=1)
    other_opt = optimizer(other, backend)
    msd, osd = get_state_dict(other, other_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(other, other_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded_max = [other_opt.state[p]["max_norm"].clone() for p in other.parameters()]
    train(other, other_opt, half, first=half, rank=rank, world=world)
    return {"continued": _full(model), "resumed": _full(other), "saved_max": saved_max, "loaded_max": loaded_max,
            "max_norm_types": sorted({(type(t).__name__, str(t.dtype), t.dim()) for t in loaded_max})}


def check_dcp_reshard(mesh, backend, rank, world, directory):
    """Load a checkpoint saved by another number of ranks and continue."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    half = STEPS // 2
    model = _fsdp(mesh, seed=1)
    opt = optimizer(model, backend)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, half, first=half, rank=rank, world=world)
    return {"resumed": _full(model)}


def check_partial_grad(mesh, backend, rank, world):
    """A replicated parameter whose gradient arrives as Partial sums (tensor parallel)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    gen = torch.Generator().manual_seed(7)
    full_p, full_g = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    pieces = torch.randn(world, 6, 5, generator=gen)
    pieces[-1] = full_g - pieces[:-1].sum(0)
    p = nn.Parameter(distribute_tensor(full_p.clone(), mesh, [Replicate()]))
    p.grad = DTensor.from_local(pieces[rank], mesh, [Partial()])
    opt = Fromage([p], lr=LR, p_bound=P_BOUND, backend=backend)
    opt.step()
    return {"full_p": full_p, "full_g": full_g, "stepped": p.detach().full_tensor()}


def check_bad_input(mesh, backend, rank, world):
    """A parameter with a Partial placement is refused before anything changes."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    good = nn.Parameter(distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)]))
    good.grad = distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)])
    bad = nn.Parameter(DTensor.from_local(torch.randn(2), mesh, [Partial()]))
    bad.grad = DTensor.from_local(torch.randn(2), mesh, [Partial()])
    before = good.detach().to_local().clone()
    opt = Fromage([good, bad], lr=LR, p_bound=P_BOUND, backend=backend)
    try:
        opt.step()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    return {"error": error, "unchanged": torch.equal(before, good.detach().to_local())}


def check_2d_sharded(mesh2d, backend, rank, world):
    """A tensor sharded over both dimensions of a 2-D mesh: one all-reduce over the flattened group."""
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(11)
    full_p, full_g = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    p = nn.Parameter(distribute_tensor(full_p.clone(), mesh2d, [Shard(0), Shard(1)]))
    p.grad = distribute_tensor(full_g.clone(), mesh2d, [Shard(0), Shard(1)])
    counts = []
    opt = Fromage([p], lr=LR, p_bound=P_BOUND, backend=backend)
    _counted_step(counts)(opt)
    return {"full_p": full_p, "full_g": full_g, "stepped": p.detach().full_tensor(), "comm_counts": counts}


def check_zero_warning(mesh, backend, rank, world):
    """The all-zero warning of p_bound groups judges the full tensor, not the local shard: one
    tensor nonzero on rank 0's shard only (no warning), one zero everywhere (a warning)."""
    import warnings

    from torch.distributed.tensor import Shard, distribute_tensor

    placements = [Shard(0)] * mesh.ndim
    rows = 2 * mesh.size() + 1
    first_only = torch.zeros(rows, 3)
    first_only[0, 0] = 1.0
    a = nn.Parameter(distribute_tensor(first_only, mesh, placements))
    b = nn.Parameter(distribute_tensor(torch.zeros(rows), mesh, placements))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Fromage([a, b], lr=LR, p_bound=P_BOUND, backend=backend)
    return [str(w.message) for w in record]


def run(rank: int, world: int, store: str, outdir: str, backends, resume_from=None):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # ranks share two cores; also keeps a forked child off the parent's thread pool
    # a rank left waiting in a collective fails after a minute instead of hanging the test run
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
        out = {"fsdp": {b: check_fsdp(mesh, b, rank, world) for b in backends}}
        out["partial_grad"] = check_partial_grad(mesh, backends[0], rank, world)
        out["zero_warning"] = check_zero_warning(mesh, backends[0], rank, world)
        if world == 2:
            out["lars_fsdp"] = {b: check_fsdp(mesh, b, rank, world, make=lars_optimizer) for b in backends}
            out["lars_fsdp_monitored"] = {b: check_fsdp(mesh, b, rank, world, make=lars_monitored_optimizer)
                                          for b in backends}
            out["lamb_fsdp"] = {b: check_fsdp(mesh, b, rank, world, make=lamb_optimizer) for b in backends}
            out["bad_input"] = check_bad_input(mesh, backends[0], rank, world)
            out["ddp"] = check_ddp(backends[0], rank, world)
            out["dcp"] = check_dcp(mesh, backends[0], rank, world, os.path.join(outdir, "ckpt"))
        if world == 4:
            mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
            out["hsdp"] = check_fsdp(mesh2d, backends[0], rank, world)
            out["sharded_2d"] = check_2d_sharded(mesh2d, backends[0], rank, world)
            out["zero_warning_2d"] = check_zero_warning(mesh2d, backends[0], rank, world)
        if resume_from is not None:
            out["dcp_reshard"] = check_dcp_reshard(mesh, backends[0], rank, world, resume_from)
        torch.save(out, os.path.join(outdir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(world: int, outdir: str, backends, resume_from=None):
    """Start ``world`` ranks (forked: the children skip re-importing torch) and load their results.
    ``resume_from``: a DCP checkpoint (saved by ``check_dcp``) to load and continue from."""
    import torch.multiprocessing as mp

    # Imported here, once, rather than in every child.
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor.debug  # noqa: F401
    import torch.nn.parallel  # noqa: F401

    store = os.path.join(outdir, f"store{world}")
    if os.path.exists(store):
        os.remove(store)  # a file store left by an earlier run would hand out stale addresses
    mp.start_processes(run, args=(world, store, outdir, list(backends), resume_from), nprocs=world, start_method="fork")
    return [torch.load(os.path.join(outdir, f"r{r}.pt"), weights_only=False) for r in range(world)]


