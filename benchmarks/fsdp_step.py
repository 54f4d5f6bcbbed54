"""The optimizer step under FSDP2 (CPU, gloo, N ranks) against the same step without sharding.

    python benchmarks/fsdp_step.py [--world 2] [--layers 8] [--width 1024] [--steps 20]

Every process uses one thread, so the comparison is per core: unsharded, one process steps the
whole model; sharded, each rank steps its shard and joins one all-reduce of 3 floats per tensor.
Reports median and fastest step times (the slowest rank's), the median time of that all-reduce
alone, and the bytes each rank contributes to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

from fromage_fused import Fromage
from fromage_fused.distributed import stats_bytes_per_step


def model(layers, width):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def time_steps(opt, steps, sync=lambda: None):
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def unsharded(args):
    m = model(args.layers, args.width)
    m(torch.randn(4, args.width)).sum().backward()
    opt = Fromage(m.parameters(), lr=0.01, p_bound=1.0, backend=args.backend)
    time_steps(opt, 2)
    return time_steps(opt, args.steps)


def rank_main(rank, args, store, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world)
    mesh = init_device_mesh("cpu", (args.world,))
    m = model(args.layers, args.width)
    for layer in m:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    m(torch.randn(4, args.width)).sum().backward()
    opt = Fromage(m.parameters(), lr=0.01, p_bound=1.0, backend=args.backend)
    time_steps(opt, 2, dist.barrier)
    step, step_min = time_steps(opt, args.steps, dist.barrier)
    n = len(list(m.parameters()))
    stats = torch.zeros(n, 3)
    reduce_times = []
    for _ in range(args.steps):
        dist.barrier()
        t = time.perf_counter()
        dist.all_reduce(stats)
        reduce_times.append(time.perf_counter() - t)
    payload = sum(stats_bytes_per_step(list(m.parameters())).values())
    torch.save({"step": step, "step_min": step_min, "all_reduce": statistics.median(reduce_times), "bytes": payload,
                "tensors": n},
               os.path.join(out, f"r{rank}.pt"))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    import torch.distributed.fsdp  # noqa: F401  (imported once, before the ranks fork)
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    base, base_min = unsharded(args)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(args, os.path.join(out, "store"), out), nprocs=args.world,
                           start_method="fork")
        ranks = [torch.load(os.path.join(out, f"r{r}.pt")) for r in range(args.world)]
    step = max(r["step"] for r in ranks)
    step_min = max(r["step_min"] for r in ranks)
    reduce = max(r["all_reduce"] for r in ranks)
    nparams = args.layers * (args.width * args.width + args.width)
    result = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "backend": args.backend, "world": args.world, "tensors": ranks[0]["tensors"], "params": nparams,
        "unsharded_step_ms": round(base * 1e3, 3), "fsdp_step_ms": round(step * 1e3, 3),
        # the fastest step: less exposed to other processes sharing the cores
        "unsharded_step_min_ms": round(base_min * 1e3, 3), "fsdp_step_min_ms": round(step_min * 1e3, 3),
        "all_reduce_alone_ms": round(reduce * 1e3, 3),
        "all_reduce_payload_bytes_per_rank": ranks[0]["bytes"],
        # a ring all-reduce sends and receives 2(N-1)/N times the payload per rank
        "ring_bytes_sent_per_rank": int(2 * (args.world - 1) / args.world * ranks[0]["bytes"]),
        "param_bytes_per_rank": nparams * 4 // args.world,
    }
    print(json.dumps(result, indent=1))
    print(f"\n{nparams / 1e6:.1f}M fp32 params in {result['tensors']} tensors, {args.world} ranks, 1 thread each: "
          f"median step {result['unsharded_step_ms']:.2f} ms unsharded -> {result['fsdp_step_ms']:.2f} ms per rank "
          f"sharded (fastest {result['unsharded_step_min_ms']:.2f} -> {result['fsdp_step_min_ms']:.2f} ms) "
          f"(of which the stats all-reduce alone takes {result['all_reduce_alone_ms']:.3f} ms); "
          f"{result['all_reduce_payload_bytes_per_rank']} bytes per rank per step")


if __name__ == "__main__":
    main()
