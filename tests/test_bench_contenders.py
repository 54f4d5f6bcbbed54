"""The benchmark's contenders compute what they claim, and report what they cannot do."""
import pytest
import torch

from fromage_fused import Fromage
from fromage_fused.bench import contenders as C
from fromage_fused.bench.loop import LoopFromage
from fromage_fused.bench.runner import Config, _Data


def _tensors(dtype=torch.float64):
    shapes = [(7, 3), (5,), (1,), (4, 4)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    grads[2].zero_()  # the zero-norm branch
    return params, grads


@pytest.mark.parametrize("p_bound", [None, 1.0])
def test_loop_matches_the_reference_backend(p_bound):
    params, grads = _tensors()
    mine = [p.clone() for p in params]
    initial = [float(p.norm()) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    for p, g in zip(mine, grads):
        p.grad = g.clone()
    loop = LoopFromage(params, lr=0.1, p_bound=p_bound)
    ref = Fromage(mine, lr=0.1, p_bound=p_bound, backend="reference")
    for _ in range(5):
        loop.step()
        ref.step()
    # Fromage keeps max_norm in float32 by contract, the loop as a Python float: 1e-7 relative apart.
    tol = 1e-12 if p_bound is None else 1e-6
    for a, b in zip(params, mine):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if p_bound is not None:  # the bound was active: some tensor sits exactly at its initial norm
        at_bound = [abs(float(p.norm()) - n0) < 1e-9 * n0 for p, n0 in zip(params, initial)]
        assert any(at_bound) and not all(at_bound)


def _ctx(**settings):
    return C.Context("tiny", C.Settings(**settings))


def test_compile_failure_is_a_skip_with_the_reason(monkeypatch):
    def broken(fn):
        def run(*args):
            raise RuntimeError("no C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    params, grads = _tensors(torch.float32)
    for p, g in zip(params, grads):
        p.grad = g
    with pytest.raises(C.Skip, match="torch.compile failed: RuntimeError: no C\\+\\+ compiler$"):
        C._compile(params, _ctx())
    with pytest.raises(C.Skip, match="compile-max-tensors"):
        C._compile(params, _ctx(compile_max_tensors=2))
    with pytest.raises(C.Skip, match="only on"):
        C._compile(params, _ctx(compile_presets=("other",)))


def test_unsupported_fused_optimizer_says_so_and_runs_foreach(monkeypatch):
    real = torch.optim.SGD

    class NoFused(real):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("`fused=True` requires CUDA")
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "SGD", NoFused)
    params, grads = _tensors(torch.float32)
    for p, g in zip(params, grads):
        p.grad = g
    ctx = _ctx()
    sgd = [c for c in C.all_contenders("cpu", C.Settings()) if c.name == "torch:sgd"][0]
    before = [p.clone() for p in params]
    sgd_builder = C._torch_optimizer(NoFused, "lr")
    step = sgd_builder(params, ctx)
    step()
    assert "fused=True unsupported" in ctx.notes[0] and "foreach=True" in ctx.notes[0]
    assert any(not torch.equal(a, b) for a, b in zip(params, before))
    assert sgd.work == 12


def test_rotation_and_fresh_gradient_storage():
    cfg = Config(device=torch.device("cpu"), presets=[], fresh_grads=True)
    data = _Data([(3,), (4, 2)], 2, cfg)
    first = [p.grad.data_ptr() for p in data.params[1]]
    assert data.prepare() == 1
    swapped = [p.grad.data_ptr() for p in data.params[1]]
    assert all(a != b for a, b in zip(first, swapped))
    torch.testing.assert_close(data.params[1][0].grad, data.grads[1][0][0])
    assert data.prepare() == 0
    assert data.prepare() == 1
    assert [p.grad.data_ptr() for p in data.params[1]] == first


def test_out_of_memory_is_a_skipped_row(monkeypatch):
    from fromage_fused.bench import runner as R
    from fromage_fused.bench.presets import Preset

    tiny = Preset("tiny", "", lambda: [(3,), (4, 2)], lambda: [(3,), (4, 2)])

    def no_memory(params, ctx):
        raise MemoryError("cannot allocate 80 GB")

    cfg = Config(device=torch.device("cpu"), presets=[tiny], contender_patterns=["loop", "fromage:foreach"],
                 repeats=3, warmup=1, copy_bytes=2**20, progress=False, plot=False, max_spread=float("inf"))
    monkeypatch.setattr(C, "_loop", no_memory)
    rows, _ = R.run(cfg, log=lambda msg: None)
    by = {r["contender"]: r for r in rows}
    assert by["loop"]["status"] == "skipped" and "out of memory: cannot allocate 80 GB" in by["loop"]["note"]
    assert by["fromage:foreach"]["status"] == "ok"

    def no_room(*args):
        raise MemoryError("no room for the tensors")

    monkeypatch.setattr(R, "_Data", no_room)
    rows, _ = R.run(cfg, log=lambda msg: None)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert all("no room for the tensors" in r["note"] for r in rows)


def test_amp_fromage_step_equals_a_plain_step():
    # Under GradScaler the gradients carry the scale; Fromage's step does not depend on it.
    params, grads = _tensors(torch.float32)
    plain = [p.clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g * 2.0 ** 16
    for p, g in zip(plain, grads):
        p.grad = g.clone()
    amp = [c for c in C.all_contenders("cpu", C.Settings()) if c.name == "amp:fromage"][0]
    step = amp.build(params, _ctx())
    ref = Fromage(plain, lr=C.Settings().lr)
    for _ in range(3):
        step()
        ref.step()
    for a, b in zip(params, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
