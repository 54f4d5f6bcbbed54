"""The LARS and LAMB contenders of the benchmark compute what they claim, count their bytes
right, and say what they cannot do; the interleaved timing script runs them in turn."""
import json
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import _oracle_lamb
import _oracle_lars
import fromage_fused
from fromage_fused.bench import contenders as C
from fromage_fused.bench import external, layerwise, traffic


@pytest.fixture
def timm_classes():
    try:
        return external.timm_optimizers()
    except external.Unavailable as exc:
        pytest.skip(f"timm's Lars/Lamb are not available: {exc}")


def _by_name(device="cpu"):
    return {c.name: c for c in C.all_contenders(device, C.Settings())}


def _tensors(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (1,), (4, 4)]
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads[2].zero_()
    for p, g in zip(params, grads):
        p.grad = g
    return params, grads


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_timm_contender_steps_the_documented_rule_with_the_shared_options(timm_classes, kind):
    params, grads = _tensors()
    mine = [p.detach().clone() for p in params]
    step = _by_name()[f"timm:{kind}"].build(params, C.Context("tiny", C.Settings()))
    if kind == "lars":
        groups = [dict(layerwise.LARS_OPTIONS, params=mine, grads=grads, state=[{} for _ in mine])]
    else:
        options = dict(layerwise.LAMB_OPTIONS)
        clip = options.pop("max_grad_norm")
        groups = [dict(options, params=mine, grads=grads, state=[{} for _ in mine])]
    for _ in range(4):
        step()
        if kind == "lars":
            _oracle_lars.lars_step(groups)
        else:
            _oracle_lamb.lamb_step(groups, max_grad_norm=clip, max_lr=options["lr"])
    for p, q in zip(params, mine):
        torch.testing.assert_close(p.detach(), q, atol=1e-13, rtol=1e-12)


def test_timm_contenders_skip_with_what_to_install(monkeypatch):
    def missing():
        raise external.Unavailable('timm is not installed: pip install --no-deps "timm==1.0.31"')

    monkeypatch.setattr(external, "timm_optimizers", missing)
    params, _ = _tensors(torch.float32)
    for kind in ("lars", "lamb"):
        with pytest.raises(C.Skip, match="pip install --no-deps"):
            _by_name()[f"timm:{kind}"].build(params, C.Context("tiny", C.Settings()))


def test_timm_loader_names_what_is_missing(monkeypatch):
    monkeypatch.delitem(sys.modules, "timm.optim", raising=False)
    monkeypatch.setattr(external.importlib.metadata, "version", lambda name: (_ for _ in ()).throw(
        external.importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(external.Unavailable, match="timm is not installed"):
        external.timm_optimizers()


class _Traffic(TorchDispatchMode):
    """Bytes read and written of the tensors with ``n`` elements, per aten call (views move none)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.bytes, self.passes = n, 0, 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            def big(tree):
                return {t.data_ptr() for t in tree_flatten(tree)[0]
                        if isinstance(t, torch.Tensor) and t.numel() == self.n}

            moved = len(big((args, kwargs))) + len(big(out))
            self.bytes += 4 * moved
            self.passes += moved > 0
        return out


@pytest.mark.parametrize("kind,expected", [("lars", traffic.TIMM_LARS), ("lamb", traffic.TIMM_LAMB)])
def test_timm_traffic_is_what_its_ops_move(timm_classes, kind, expected):
    # One fp32 tensor, the step after the first (state exists): every pass over the tensor counted.
    n = 4096
    p = torch.randn(n, requires_grad=True)
    p.grad = torch.randn(n)
    step = _by_name()[f"timm:{kind}"].build([p], C.Context("tiny", C.Settings()))
    step()
    with _Traffic(n) as count:
        step()
    assert count.bytes == expected
    assert count.passes == {"lars": 7, "lamb": 15}[kind]


def test_apex_fused_lamb_is_a_gpu_contender_with_timms_lamb_options(monkeypatch):
    assert "apex:fusedlamb" not in _by_name("cpu")
    apex = [c for c in layerwise.contenders_for("cuda", C.Settings(), C) if c.name == "apex:fusedlamb"]
    assert len(apex) == 1
    params, _ = _tensors(torch.float32)
    ctx = C.Context("tiny", C.Settings())
    monkeypatch.setitem(sys.modules, "apex", None)  # not importable, whatever is installed
    with pytest.raises(C.Skip, match="FusedLAMB is not importable"):
        apex[0].build(params, ctx)
    made = {}

    class FusedLAMB:
        def __init__(self, params, **kw):
            made.update(kw)

        def step(self):
            pass

    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedLAMB = FusedLAMB
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)
    apex[0].build(params, ctx)
    assert made == dict(layerwise.LAMB_OPTIONS, adam_w_mode=True, use_nvlamb=False)
    with pytest.raises(C.Skip, match="fp32 and fp16"):
        apex[0].build([p.to(torch.bfloat16) for p in params], ctx)


def test_this_packages_lars_and_lamb_join_on_every_backend_with_the_same_options(monkeypatch):
    made = []

    def fake(kind):
        class Rule:
            def __init__(self, params, *, backend, **options):
                made.append((kind, backend, options))

            def step(self):
                pass

        return Rule

    for kind in ("LARS", "LAMB"):
        monkeypatch.delattr(fromage_fused, kind, raising=False)
    assert not [n for n in _by_name() if n.startswith(("lars:", "lamb:"))]
    monkeypatch.setattr(fromage_fused, "LARS", fake("lars"), raising=False)
    monkeypatch.setattr(fromage_fused, "LAMB", fake("lamb"), raising=False)
    found = _by_name()
    params, _ = _tensors(torch.float32)
    for kind, options, work in (("lars", layerwise.LARS_OPTIONS, traffic.LARS_MOMENTUM),
                                ("lamb", layerwise.LAMB_OPTIONS, traffic.LAMB_CLIPPED)):
        for backend in fromage_fused.available_backends("cpu"):
            contender = found[f"{kind}:{backend}"]
            assert contender.work == work and found[f"timm:{kind}"].work == work
            contender.build(params, C.Context("tiny", C.Settings()))
            assert made[-1] == (kind, backend, options)


def test_interleaved_timing_runs_every_contender_in_turn(monkeypatch, tmp_path):
    import importlib.util
    from pathlib import Path

    from fromage_fused.bench import presets as P

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "interleaved.py"
    spec = importlib.util.spec_from_file_location("interleaved", path)
    interleaved = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interleaved)
    tiny = P.Preset("tiny", "", lambda: [(3, 5), (7,)], lambda: [(3, 5), (7,)])
    monkeypatch.setattr(P, "PRESETS", {"tiny": tiny})
    calls = []
    real = C.all_contenders

    def counted(*args, **kw):
        found = real(*args, **kw)
        for c in found:
            build = c.build

            def wrapped(params, ctx, build=build, name=c.name):
                step = build(params, ctx)
                return lambda: (calls.append(name), step())[1]

            c.build = wrapped
        return found

    monkeypatch.setattr(C, "all_contenders", counted)
    out = tmp_path / "r.json"
    interleaved.main(["--presets", "tiny", "--contenders", "torch:sgd,torch:adamw", "--rounds", "4", "--sets", "2",
                      "--baseline", "torch:adamw", "--out", str(out)])
    rows = {r["contender"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch:sgd", "torch:adamw"}
    assert all(r["rounds"] == 4 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] for r in rows.values())
    assert rows["torch:adamw"]["over_torch:adamw"] == 1.0
    timed = calls[-8:]  # the rounds alternate, the first contender changing every round
    assert timed == ["torch:sgd", "torch:adamw", "torch:adamw", "torch:sgd"] * 2
