"""The benchmark's arithmetic: byte counts, bandwidth, percentiles, rotation, ratios; and its presets."""
import math

import pytest
import torch

from fromage_fused.bench import contenders as C
from fromage_fused.bench import measure, traffic
from fromage_fused.bench.presets import PRESETS, many_small, numel
from fromage_fused.bench.runner import add_ratios


def test_gbps_and_copy_bandwidth():
    # 1M fp32 params at the two-phase 20 B/param in 10 ms: 20 MB / 0.01 s = 2 GB/s.
    assert traffic.gbps(10**6, traffic.FROMAGE_TWO_PHASE, 0.01) == pytest.approx(2.0)
    assert traffic.gbps(10**6, 20, None) is None
    assert traffic.gbps(10**6, 20, 0.0) is None
    # A copy of 1 GB reads 1 GB and writes 1 GB.
    assert traffic.copy_gbps(10**9, 0.5) == pytest.approx(4.0)
    assert traffic.fraction(2.0, 4.0) == pytest.approx(0.5)
    assert traffic.fraction(2.0, None) is None and traffic.fraction(None, 4.0) is None


def test_speedup_is_baseline_over_time():
    assert traffic.speedup(0.3, 0.1) == pytest.approx(3.0)
    assert traffic.speedup(0.1, 0.3) == pytest.approx(1 / 3)
    assert traffic.speedup(None, 0.1) is None and traffic.speedup(0.1, None) is None


def test_byte_counts_per_contender_and_dtype():
    assert (traffic.SGD, traffic.ADAMW, traffic.FROMAGE_TWO_PHASE, traffic.FOREACH) == (12, 28, 20, 36)
    # The floor is one read of p and g and one write of p, 4 bytes each.
    assert traffic.SGD == 3 * 4 and traffic.ADAMW == 7 * 4 and traffic.FROMAGE_TWO_PHASE == 5 * 4
    assert traffic.scaled(20, torch.bfloat16) == 10
    assert traffic.scaled(20, torch.float16) == 10
    assert traffic.scaled(20, torch.float64) == 40
    by_name = {c.name: c for c in C.all_contenders("cpu", C.Settings())}
    assert by_name["torch:sgd"].work == 12 and by_name["torch:adamw"].work == 28
    assert by_name["fromage:foreach"].traffic == 36 and by_name["loop"].traffic == 36
    # an AMP step reads the gradients once more for GradScaler's inf check
    assert by_name["amp:fromage"].work == 24 and by_name["amp:adamw"].work == 32
    assert all(c.work == 20 for n, c in by_name.items() if n.startswith(("fromage:", "loop", "compile:")))
    bounded = {c.name: c for c in C.all_contenders("cpu", C.Settings(p_bound=1.0))}
    assert bounded["fromage:foreach"].traffic == 36 + traffic.INNER_PRODUCT
    assert bounded["loop"].traffic == 36 + traffic.LOOP_BOUND_NORM


def test_percentiles_match_linear_interpolation():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert measure.percentile(values, 50) == 3.0
    assert measure.percentile(values, 25) == 2.0
    assert measure.percentile([1.0, 2.0], 50) == 1.5
    timing = measure.Timing([0.4, 0.1, 0.3, 0.2])
    assert (timing.q1, timing.median, timing.q3) == pytest.approx((0.175, 0.25, 0.325))
    with pytest.raises(ValueError):
        measure.percentile([], 50)


def test_rotation_only_when_the_data_fits_in_cache():
    cache = 50 * 2**20
    assert measure.parameter_sets(4 * cache, cache) == 1
    assert measure.parameter_sets(cache, cache) == 4
    assert measure.parameter_sets(3 * cache, cache) == 2
    assert measure.parameter_sets(1, cache, limit=32) == 32
    assert measure.repeats_within(10.0, 0.5, 100) == 20
    assert measure.repeats_within(10.0, 100.0, 100) == 3
    assert measure.repeats_within(10.0, 0.001, 100) == 100


def test_ratios_fill_from_the_baselines_of_the_same_preset():
    rows = [dict(preset=p, contender=c, status="ok", median_ms=m) for p, c, m in [
        ("a", "loop", 30.0), ("a", "fromage:foreach", 10.0), ("a", "torch:sgd", 2.0), ("a", "torch:adamw", 4.0),
        ("a", "fromage:x", 5.0), ("b", "fromage:x", 1.0)]]
    rows.append(dict(preset="a", contender="compile:foreach", status="skipped", median_ms=None))
    add_ratios(rows)
    x = rows[4]
    assert (x["vs_loop"], x["vs_foreach"], x["vs_sgd"], x["vs_adamw"]) == pytest.approx((6.0, 2.0, 0.4, 0.8))
    assert rows[5]["vs_loop"] is None  # preset b has no loop row
    assert rows[6]["vs_loop"] is None


@pytest.mark.parametrize("name, params, tensors", [
    ("resnet50", 25_557_032, 161), ("gpt2-small", 124_439_808, 148), ("gpt2-medium", 354_823_168, 292),
    ("decoder-1b", 1_100_048_384, 201), ("vit-b16", 86_567_656, 152)])
def test_presets_match_the_published_architectures(name, params, tensors):
    full, cpu = PRESETS[name].full(), PRESETS[name].cpu()
    assert (numel(full), len(full)) == (params, tensors)
    assert len(cpu) == tensors and numel(cpu) < params / 4


def test_stress_presets():
    small = PRESETS["many-small"].full()
    assert len(small) >= 2000 and max(math.prod(s) for s in small) <= 65536 and min(math.prod(s) for s in small) == 1
    assert PRESETS["few-huge"].full() == [(256 * 2**20,)] * 4
    assert len(many_small(10, 64)) == 10


def test_every_parameter_set_takes_its_first_step_before_the_timed_ones(monkeypatch):
    """A first step (state, Fromage's step plan, compilation) is not a sample: the runner warms up
    every parameter set once before the warm-up proper and the timed steps."""
    from fromage_fused.bench import runner

    sets, seen, timed_from = 6, [], []
    data = runner._Data([(3,)], sets, runner.Config(device=torch.device("cpu"), presets=[]))
    real = measure.time_cpu
    monkeypatch.setattr(measure, "time_cpu",
                        lambda step, prepare, repeats: (timed_from.append(len(seen)), real(step, prepare, repeats))[1])

    probe = C.Contender("probe", 12.0, 12.0, lambda params, ctx: lambda: seen.append(data.turn))
    cfg = runner.Config(device=torch.device("cpu"), presets=[], warmup=1, repeats=4, budget_s=10)
    row = runner._measure_row({}, cfg, PRESETS["resnet50"], [(3,)], sets, probe, data, 1.0, print)
    assert row is not None and timed_from, "the row was not timed"
    assert timed_from[0] == sets + 1, f"untimed steps before the timed ones: {seen[:timed_from[0]]}"
    assert set(seen[:timed_from[0]]) == set(range(sets)), f"sets first stepped while timed: {seen}"
