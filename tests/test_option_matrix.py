"""Every option of ``Fromage`` through every backend that runs here, alone and combined, against the
float64 literal loop: prefactor off, maximize, p_bound, a tensor lr changed in place, loss scaling
with a skipped step (the first one, so max_norm must stay unset through it), and bf16 with
stochastic rounding. The same options through the DTensor route (a one-rank mesh) must give the
plain route's result and use the backend the optimizer resolved."""

import pytest
import torch

import fromage_fused
from fromage_fused import Fromage, functional
from fromage_fused.engine import capture
from fromage_fused.functional import UNSET_MAX_NORM
from conftest import backend_cases
from _oracle import MIXED_SHAPES, gradient_schedule, literal_step, mixed_tensors
from tolerances import ORACLE_TOL, SR_STEP_TOL

STEPS = 6
LRS = (0.05, 0.2)  # the lr changes half-way (in place when it is a tensor)
SCALE = 2.0 ** 10
SKIPPED = {0, 3}  # steps whose found_inf is set under loss scaling

#: option sets: the class's keyword arguments plus the test's own "scaled" (GradScaler's attributes)
#: and "tensor_lr"; "all" combines everything the class offers for fp32 (p_bound clamps the
#: zero-initialised tensor to zero, hiding the fallback's sign and scale: "all_unbounded" shows them).
OPTIONS = {
    "prefactor_off": dict(prefactor=False),
    "maximize": dict(maximize=True),
    "p_bound": dict(p_bound=0.9),
    "tensor_lr": dict(tensor_lr=True),
    "scaled": dict(scaled=True),  # without p_bound: the zero-initialised tensor takes the fallback
    "all": dict(prefactor=False, maximize=True, p_bound=0.9, tensor_lr=True, scaled=True),
    "all_unbounded": dict(prefactor=False, maximize=True, tensor_lr=True, scaled=True),  # fallback visible
}


def _local(p):
    p = p.detach()
    return p.to_local() if hasattr(p, "to_local") else p


def _run(backend, dtype, options, *, device="cpu", stochastic_rounding=False, wrap=None):
    """Step the mixed tensors with ``Fromage`` and check each step (and max_norm) against the literal
    loop stepped from the backend's previous values; return the final parameters (on the CPU)."""
    options = dict(options)
    tensor_lr, scaled = options.pop("tensor_lr", False), options.pop("scaled", False)
    wrap = wrap or (lambda t: t)
    params = [torch.nn.Parameter(wrap(t)) for t in mixed_tensors(dtype, device, seed=7)]
    lr = torch.tensor(LRS[0], device=device) if tensor_lr else LRS[0]
    opt = Fromage(params, lr=lr, backend=backend, stochastic_rounding=stochastic_rounding, seed=11, **options)
    p_bound = options.get("p_bound")
    max_norms = [UNSET_MAX_NORM] * len(params)
    tol = ORACLE_TOL[dtype]["step"] if not stochastic_rounding else SR_STEP_TOL
    for step in range(STEPS):
        if step == STEPS // 2:
            if tensor_lr:
                lr.fill_(LRS[1])
            else:
                opt.param_groups[0]["lr"] = LRS[1]
        value = LRS[0] if step < STEPS // 2 else LRS[1]
        g64 = gradient_schedule(step, MIXED_SHAPES, seed=7)
        grads = [None if g is None else g.to(dtype) for g in g64]
        skip = scaled and step in SKIPPED
        for p, g in zip(params, grads):
            p.grad = None if g is None else wrap((g * SCALE if scaled else g).to(device))
        before = [_local(p).double().cpu() for p in params]
        if scaled:
            opt.grad_scale = torch.tensor(SCALE, device=device)
            opt.found_inf = torch.tensor(1.0 if skip else 0.0, device=device)
        opt.step()
        for name in ("grad_scale", "found_inf"):
            opt.__dict__.pop(name, None)
        if not skip:
            literal_step(before, [None if g is None else g.double() for g in grads], max_norms,
                         lr=value, p_bound=p_bound, maximize=options.get("maximize", False),
                         prefactor=options.get("prefactor", True))
        for i, (p, want) in enumerate(zip(params, before)):
            atol, rtol = tol
            scale = want.abs().max().item() if want.numel() else 0.0
            torch.testing.assert_close(_local(p).double().cpu(), want, atol=atol + rtol * scale, rtol=0,
                                       msg=lambda m: f"{backend} step {step} tensor {i}: {m}")
        if p_bound is not None:
            got = [float(opt.state[p]["max_norm"]) for p in params]
            assert got == pytest.approx(max_norms, rel=1e-6, abs=1e-7), f"{backend} step {step} max_norm"
    return [_local(p).cpu() for p in params]


@pytest.mark.parametrize("case", list(OPTIONS))
def test_each_option_through_each_backend(device, backend, case):
    _run(backend, torch.float32, OPTIONS[case], device=device)


def test_bf16_stochastic_rounding_with_every_option(device, backend):
    got = _run(backend, torch.bfloat16, OPTIONS["all"], device=device, stochastic_rounding=True)
    # the same seed through another backend: the shared recipe on fp32 results that agree to a
    # few fp32 ulps, so nearly every element is bit-identical
    want = _run("reference", torch.bfloat16, OPTIONS["all"], stochastic_rounding=True)
    same = sum(int((a == b).sum()) for a, b in zip(got, want))
    total = sum(a.numel() for a in got)
    assert same >= 0.999 * total, f"{backend}: {total - same} of {total} bf16 elements differ from reference"


@pytest.fixture(scope="module")
def mesh():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("shard",))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["auto"] + [name for _, name in backend_cases(("cpu",), reference=False,
                                                                                   interpreted=False)])
def test_dtensor_route_takes_every_option_and_the_resolved_backend(mesh, backend, monkeypatch):
    from torch.distributed.tensor import Shard, distribute_tensor

    # A step looks nothing up in the registry: the optimizer resolved its backend per device at
    # construction, and the DTensor route must step with that same backend.
    def refuse(*args, **kwargs):
        raise AssertionError("a step resolved a backend again")

    created = Fromage.__init__

    def construct_then_refuse(self, *args, **kwargs):
        created(self, *args, **kwargs)
        monkeypatch.setattr(fromage_fused.backends, "resolve", refuse)

    monkeypatch.setattr(Fromage, "__init__", construct_then_refuse)
    _run(backend, torch.float32, OPTIONS["all"], wrap=lambda t: distribute_tensor(t, mesh, [Shard(0)]))


def _dtensor_model(mesh, lr, groups=({},)):
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(5, 3, generator=gen), mesh, [Shard(0)])) for _ in groups]
    opt = Fromage([dict(params=[p], **g) for p, g in zip(params, groups)], lr=lr, backend="foreach")

    def grads():
        for p in params:
            p.grad = distribute_tensor(torch.randn(5, 3, generator=gen), mesh, [Shard(0)])
    return params, opt, grads


def test_dtensor_route_refuses_a_python_lr_under_capture(mesh, monkeypatch):
    params, opt, grads = _dtensor_model(mesh, 0.05)
    grads()
    opt.step()  # warm, outside capture
    grads()
    before = [p.detach().to_local().clone() for p in params]
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="needs lr as a tensor"):
        opt.step()
    assert all(torch.equal(b, p.detach().to_local()) for b, p in zip(before, params))


def test_dtensor_route_finds_its_state_before_anything_changes(mesh, monkeypatch):
    # p_bound switched on after construction: the max_norm state is created by the step, which
    # capture refuses; the other group's DTensor must not have been stepped by then.
    params, opt, grads = _dtensor_model(mesh, torch.tensor(0.05), groups=({}, {}))
    grads()
    opt.step()
    opt.param_groups[1]["p_bound"] = 1.0
    grads()
    before = [p.detach().to_local().clone() for p in params]
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        opt.step()
    assert all(torch.equal(b, p.detach().to_local()) for b, p in zip(before, params))
    monkeypatch.undo()
    opt.step()
    assert float(opt.state[params[1]]["max_norm"]) > 0



@pytest.mark.backends(interpreted=False)
@pytest.mark.parametrize("p_bound", [None, 0.9])
def test_functional_reduce_stats_steps_shards_as_whole_tensors(backend, p_bound):
    # Two "ranks" hold the halves of every tensor; reduce_stats adds the other half's stats, as an
    # all-reduce would. Each half must then move exactly as its part of the whole tensor does.
    shapes = [(8, 5), (6,), (4, 3, 2)]
    whole = mixed_tensors(torch.float32, seed=2, shapes=shapes)
    grads = [t.flip(0) * 0.3 + 0.1 for t in mixed_tensors(torch.float32, seed=3, shapes=shapes)]
    cut = [len(t) // 2 for t in whole]
    halves = [[t[:c].clone() for t, c in zip(whole, cut)], [t[c:].clone() for t, c in zip(whole, cut)]]
    ghalves = [[g[:c] for g, c in zip(grads, cut)], [g[c:] for g, c in zip(grads, cut)]]
    mn = {k: None if p_bound is None else [torch.full((), UNSET_MAX_NORM) for _ in shapes] for k in ("whole", 0, 1)}
    kw = dict(lr=0.1, p_bound=p_bound, maximize=True, prefactor=False, backend=backend)
    calls = []

    def add(stats, group, other):
        calls.append((tuple(stats.shape), group.dtype))
        return stats + other

    for step in range(3):
        local = [functional.run_stats(functional.plan(h, g, None, backend=backend)[0], inner=p_bound is not None)
                 for h, g in zip(halves, ghalves)]
        for rank in (0, 1):
            functional.fromage(halves[rank], ghalves[rank], mn[rank], **kw,
                               reduce_stats=lambda s, g, other=local[1 - rank]: add(s, g, other))
        functional.fromage(whole, grads, mn["whole"], **kw)
        for i, t in enumerate(whole):
            torch.testing.assert_close(torch.cat([halves[0][i], halves[1][i]]), t, atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"step {step} tensor {i}: {m}")
        if p_bound is not None:
            for rank in (0, 1):
                torch.testing.assert_close(torch.stack(mn[rank]), torch.stack(mn["whole"]), atol=0, rtol=1e-6)
    assert calls == [((len(shapes), 3), torch.float32)] * 6


def test_dtensor_route_refuses_stochastic_rounding_before_anything_changes(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    plain = torch.nn.Parameter(torch.randn(6).to(torch.bfloat16))
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(6, 2).to(torch.bfloat16), mesh, [Shard(0)]))
    opt = Fromage([{"params": [plain]}, {"params": [sharded]}], lr=0.1, stochastic_rounding=True, backend="foreach")
    plain.grad = torch.randn(6).to(torch.bfloat16)
    sharded.grad = distribute_tensor(torch.randn(6, 2).to(torch.bfloat16), mesh, [Shard(0)])
    before = [plain.detach().clone(), sharded.detach().to_local().clone()]
    with pytest.raises(RuntimeError, match="stochastic_rounding is not supported for DTensor"):
        opt.step()
    assert torch.equal(before[0], plain.detach()) and torch.equal(before[1], sharded.detach().to_local())
