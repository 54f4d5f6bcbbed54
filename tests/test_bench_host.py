"""The host-overhead preset's contenders: they exist only for that preset, step what they claim,
and the stubs really leave the device work out."""
import pytest
import torch

from fromage_fused.bench import contenders as C
from fromage_fused.bench import host
from fromage_fused.bench.presets import PRESETS
from fromage_fused.bench.report import COLUMNS


def _params(n=6):
    ps = [torch.nn.Parameter(torch.randn(16)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(16)
    return ps


def _by_name(presets):
    return {c.name: c for c in C.all_contenders("cpu", C.Settings(), presets)}


def test_host_contenders_come_with_their_preset_only():
    assert not any(n.startswith(("bound:", "stub:")) for n in _by_name(["resnet50"]))
    names = _by_name([host.PRESET])
    assert {"torch:adamw-foreach", "stub:triton", "stub:cuda"} <= set(names) and "bound:foreach" in names
    with pytest.raises(C.NotHere):
        names["bound:foreach"].build(_params(), C.Context("resnet50", C.Settings()))
    assert PRESETS[host.PRESET].cpu() == [(16,)] * 2048 and "us_per_tensor" in COLUMNS


def test_bound_contender_steps_with_a_bound():
    ps = _params()
    step = _by_name([host.PRESET])["bound:foreach"].build(ps, C.Context(host.PRESET, C.Settings()))
    step()
    opt = step.__self__
    assert opt.param_groups[0]["p_bound"] == host.BOUND and all(float(opt.state[p]["max_norm"]) > 0 for p in ps)


# ids without "cuda": these run on the CPU (tests/test_gpu_markers.py reads "cuda" in an id as a GPU case)
@pytest.mark.parametrize("name", ["stub:triton", "stub:cuda"], ids=["stub-triton", "stub-native"])
def test_stubs_run_the_host_side_and_change_nothing(name):
    if name == "stub:triton":
        pytest.importorskip("triton")
    ps = _params()
    before = [p.detach().clone() for p in ps]
    step = _by_name([host.PRESET])[name].build(ps, C.Context(host.PRESET, C.Settings()))
    step()
    step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps))  # no kernel ran
