"""The ``cpu`` backend's step on ResNet-50-shaped fp32 tensors, against ``foreach`` and against the
copy bandwidth of a large buffer measured in the same run. Usage: python benchmarks/cpu_native_check.py"""
import argparse
import json

import torch
import torch.utils.benchmark as tb

from fromage_fused import functional

BYTES_PER_PARAM = 20  # stats reads p and g; apply reads p and g and writes p (fp32)


def resnet50_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            for out_c, in_c, k in ((width, inplanes, 1), (width, width, 3), (4 * width, width, 1)):
                shapes += [(out_c, in_c, k, k), (out_c,), (out_c,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def median_s(stmt, env, min_run_time):
    return tb.Timer(stmt=stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-run-time", type=float, default=2.0)
    args = ap.parse_args()
    shapes = resnet50_shapes()
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    n = sum(p.numel() for p in params)
    lr = torch.tensor(0.01)
    src = torch.randn(n)
    dst = torch.empty_like(src)
    env = dict(functional=functional, params=params, grads=grads, lr=lr, src=src, dst=dst)
    result = {"tensors": len(params), "params": n, "threads": torch.get_num_threads(), "torch": torch.__version__}
    t_copy = median_s("dst.copy_(src)", env, args.min_run_time)
    result["copy_GBps"] = 8 * n / t_copy / 1e9
    for backend in ("cpu", "foreach"):
        functional.fromage(params, grads, None, lr=lr, backend=backend)  # warm-up (and JIT build)
        env["groups"] = functional.plan(params, grads, None, backend=backend)
        t_step = median_s(f"functional.fromage(params, grads, None, lr=lr, backend={backend!r})", env,
                          args.min_run_time)
        t_phases = median_s("functional.step_groups(groups, lr=lr)", env, args.min_run_time)
        result[backend] = {
            "step_ms": 1e3 * t_step,
            "phases_ms": 1e3 * t_phases,
            "GBps": BYTES_PER_PARAM * n / t_step / 1e9,
            "fraction_of_copy": BYTES_PER_PARAM * n / t_step / 1e9 / result["copy_GBps"],
        }
    result["cpu_speedup_over_foreach"] = result["foreach"]["step_ms"] / result["cpu"]["step_ms"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
