"""One optimizer step per (preset x contender), as pytest-benchmark rows.

    pytest benchmarks --benchmark-only [-k gpt2] [--benchmark-json out.json]

Same presets, contenders and rotation as ``python -m fromage_fused.bench``; the CLI adds the copy
bandwidth, ratios, CSV and plot.
"""
import pytest
import torch

from conftest import DEVICE, PRESET_NAMES
from fromage_fused.bench import contenders, traffic
from fromage_fused.bench.presets import numel

SETTINGS = contenders.Settings(compile_presets=() if DEVICE.type == "cpu" else None)
CONTENDERS = contenders.all_contenders(DEVICE, SETTINGS)


@pytest.mark.parametrize("contender", CONTENDERS, ids=[c.name for c in CONTENDERS])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_step(benchmark, preset, contender, preset_data):
    shapes, data = preset_data
    ctx = contenders.Context(preset, SETTINGS)
    try:
        steps = [contender.build(params, ctx) for params in data.params]
    except contenders.Skip as why:
        pytest.skip(str(why))

    def step():
        steps[data.turn]()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    def prepare():  # pytest-benchmark reads a returned value as the step's arguments
        data.prepare()

    # Warm-up rounds cover every parameter set's first step (state, Fromage's step plan), as in the CLI.
    benchmark.pedantic(step, setup=prepare, rounds=20 if DEVICE.type == "cuda" else 5,
                       warmup_rounds=len(steps) + 2, iterations=1)
    n = numel(shapes)
    benchmark.extra_info.update(n_params=n, n_tensors=len(shapes), note="; ".join(ctx.notes),
                                work_bytes_per_param=contender.work,
                                gbps_at_median=traffic.gbps(n, contender.work, benchmark.stats.stats.median))
