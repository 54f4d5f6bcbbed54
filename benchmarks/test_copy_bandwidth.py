"""The device-to-device copy every GB/s figure is compared with."""
import torch

from conftest import DEVICE
from fromage_fused.bench import measure, traffic


def test_copy(benchmark):
    nbytes = measure.default_copy_bytes(DEVICE)
    src = torch.empty(nbytes // 4, device=DEVICE).uniform_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.pedantic(copy, rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info["copy_gbps_at_median"] = traffic.copy_gbps(nbytes, benchmark.stats.stats.median)
