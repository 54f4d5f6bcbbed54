"""LARS as a rule on the engine, on every backend, against the float64 oracle (tests/_oracle_lars.py,
itself held to timm's ``Lars`` by test_lars_lamb_oracles.py).

Training runs feed the optimizer and the oracle the same gradients (the optimizer's model computes
them), with None and all-zero gradients on a schedule and zero-initialised tensors, and compare
parameters and momentum buffers: float64 on the Python backends (the kernels take float32, bf16 and
fp16), float32 and bf16 on all.
"""
import copy
import io
import math

import pytest
import torch
from torch import nn

import _oracle_lars
from _layerwise_models import MODELS, assert_rounds_stochastically, close, dtype_and_tol, gradients, hand, \
    make_model
from _param_split import split
from _host_reads import forbid_host_reads
from fromage_fused import backends
from fromage_fused.rules.lars import LARS, LARS_RULE
from fromage_fused.rules.lars import flags as lars_flags
from tolerances import ORACLE_TOL

STEPS = 200
CHECK_EVERY = 20

#: (atol, rtol) per dtype, rtol relative to the tensor's largest magnitude. float64: 200 steps from
#: the same start (sums and products in another order than the oracle's). fp32 and bf16: one step
#: from the optimizer's own values (the trajectories of a rounding format drift apart); the buffers
#: of bf16 parameters are float32 state, so they are held to the float32 bound.
TOL = {
    torch.float64: ORACLE_TOL[torch.float64]["traj"],
    torch.float32: ORACLE_TOL[torch.float32]["step"],
    torch.bfloat16: ORACLE_TOL[torch.bfloat16]["step"],
}
BUFFER_TOL = {torch.float64: TOL[torch.float64], torch.float32: TOL[torch.float32], torch.bfloat16: TOL[torch.float32]}

#: (options, lr): every boolean both ways, weight decay zero and not (group 1 never decays); as the
#: oracle's parity grid against timm.
CASES = [
    (dict(weight_decay=1e-4, momentum=0.9), 1.0),
    (dict(weight_decay=1e-4, momentum=0.9, nesterov=True), 1.0),
    (dict(weight_decay=1e-4, momentum=0.9, dampening=0.5), 1.0),
    (dict(weight_decay=5e-4, momentum=0.9, trust_clip=True, trust_coeff=0.02), 0.02),
    (dict(weight_decay=1e-4, momentum=0.9, always_adapt=True, trust_clip=True, nesterov=True, eps=1e-3), 0.5),
    (dict(weight_decay=5e-4), 1.0),
    (dict(momentum=0.9, always_adapt=True), 1.0),
    (dict(momentum=0.9), 0.05),
    (dict(), 0.05),
    (dict(weight_decay=1e-4, always_adapt=True, trust_clip=True), 2.0),  # lr > 1: a clipped ratio of 1 is 1/lr
]


# ---------------------------------------------------------------- models, data, the harness

def _oracle_groups(ours, options, lr):
    groups = [dict(options, lr=lr, params=[p.detach().double().clone() for p in ps], grads=None,
                   state=[{} for _ in ps]) for ps in ours]
    groups[1]["weight_decay"] = 0.0
    return groups


def _compare(opt, ours, groups, tol, buffer_tol, where):
    for gi, (ps, group) in enumerate(zip(ours, groups)):
        for i, (p, q, state) in enumerate(zip(ps, group["params"], group["state"])):
            close(p, q, tol, f"{where}: group {gi} parameter {i}")
            mine = opt.state.get(p, {})
            assert set(mine) - {"momentum_started"} == set(state), f"{where}: group {gi} parameter {i} state keys"
            if "momentum_buffer" in state:
                assert float(mine["momentum_started"]) == 1
                close(mine["momentum_buffer"], state["momentum_buffer"], buffer_tol,
                       f"{where}: group {gi} parameter {i} buffer")


# ---------------------------------------------------------------- float64 training against the oracle

@pytest.mark.usefixtures("one_thread")
@pytest.mark.backends(fused=False)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("options,lr", CASES, ids=[str(i) for i in range(len(CASES))])
def test_float64_training_matches_the_oracle(backend, model_name, options, lr):
    model = make_model(model_name, torch.float64)
    ours = split(model)
    opt = LARS([{"params": ours[0]}, {"params": ours[1], "weight_decay": 0.0}], lr=lr, backend=backend, **options)
    groups = _oracle_groups(ours, options, lr)
    for step in range(STEPS):
        if step == STEPS // 2:
            for group in groups + opt.param_groups:
                group["lr"] = lr / 2
        hand(groups, gradients(model, ours, step, torch.float64), len(ours[0]))
        _oracle_lars.lars_step(groups)
        opt.step()
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            _compare(opt, ours, groups, TOL[torch.float64], BUFFER_TOL[torch.float64], f"{options} step {step}")
    assert {g.backend.name for g in opt._plan.groups} == {backend}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("case", [1, 2, 4])
def test_low_precision_steps_match_the_oracle(backend, dtype, model_name, case):
    # Each step from the optimizer's own values: the oracle steps float64 copies of them (and of the
    # started buffers) with the same gradients.
    options, lr = CASES[case]
    model = make_model(model_name, dtype)
    ours = split(model)
    opt = LARS([{"params": ours[0]}, {"params": ours[1], "weight_decay": 0.0}], lr=lr, backend=backend, **options)
    for step in range(20):
        groups = _oracle_groups(ours, options, lr)
        for ps, group in zip(ours, groups):
            for p, state in zip(ps, group["state"]):
                mine = opt.state.get(p, {})
                if "momentum_buffer" in mine and float(mine["momentum_started"]) == 1:
                    assert mine["momentum_buffer"].dtype == torch.float32  # float32 state for bf16 too
                    state["momentum_buffer"] = mine["momentum_buffer"].double().clone()
        hand(groups, gradients(model, ours, step, dtype), len(ours[0]))
        _oracle_lars.lars_step(groups)
        opt.step()
        _compare(opt, ours, groups, TOL[dtype], BUFFER_TOL[dtype], f"{dtype} {options} step {step}")
    assert {g.backend.name for g in opt._plan.groups} == {backend}


# ---------------------------------------------------------------- every backend has the rule

#: 4 steps from the same start: float32 as the oracle tolerances say; float16 rounds every step
#: (half an ulp, 2**-11 relative, each time) and its trust ratios follow the rounded values.
FUSED_TRAJ_TOL = {torch.float32: ORACLE_TOL[torch.float32]["traj"], torch.float16: (1e-3, 2 ** -8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [dict(momentum=0.9, weight_decay=1e-2), dict(weight_decay=1e-2),
                                     dict(momentum=0.9, dampening=0.3), dict()],
                         ids=["momentum", "no-momentum", "not-adapting", "plain"])
def test_every_backend_steps_lars_with_its_own_kernels(backend, dtype, options):
    if backend not in ("reference", "foreach"):
        assert backends.get(backend).has_rule(LARS_RULE)
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 3), (40_000,)]  # the last one is several chunks of every kernel
    start = [torch.randn(s, generator=gen) for s in shapes]
    start[1].zero_()
    params = [nn.Parameter(x.to(dtype)) for x in start]
    opt = LARS(params, lr=0.1, backend=backend, **options)
    want = [dict(params=[p.detach().double().clone() for p in params], grads=None, state=[{} for _ in params],
                 lr=0.1, **options)]
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if step == 1:
            grads[2].zero_()
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        want[0]["grads"] = [p.grad.double() for p in params]
        _oracle_lars.lars_step(want)
        opt.step()
    assert {g.backend.name for g in opt._plan.groups} == {backend}
    for i, (p, q) in enumerate(zip(params, want[0]["params"])):
        close(p, q, FUSED_TRAJ_TOL[dtype], f"parameter {i}")


def test_fromage_keeps_its_kernels():
    from fromage_fused.rules.fromage import RULE as FROMAGE

    assert backends.get("cpu").has_rule(FROMAGE)


# ---------------------------------------------------------------- loss scaling and host reads

def _small(dtype=torch.float64):
    gen = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in [(5, 3), (4,), (2, 2)]]
    with torch.no_grad():
        params[1].zero_()
    return params


def _grads(step, params, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    if step % 3 == 1:
        grads[2] = torch.zeros_like(grads[2])
    for p, g in zip(params, grads):
        p.grad = (g * scale).to(p.dtype)
    return [p.grad.double() / scale for p in params]  # as the optimizer gets them (scale: a power of two)


OPTIONS = dict(lr=0.5, momentum=0.9, dampening=0.3, weight_decay=1e-2, trust_clip=True)


def _python(backend) -> bool:
    return backend in ("reference", "foreach")


@pytest.mark.parametrize("skip_at", [0, 3])
def test_found_inf_skips_the_step_and_grad_scale_divides(backend, skip_at):
    dtype, tol = dtype_and_tol(backend)
    params = _small(dtype)
    opt = LARS(params, backend=backend, **OPTIONS)
    want = [dict(OPTIONS, params=[p.detach().double().clone() for p in params], grads=None,
                 state=[{} for _ in params])]
    scale = 2.0 ** 10  # a power of two: unscaling is exact
    for step in range(6):
        grads = _grads(step, params, scale)
        opt.grad_scale = torch.tensor(scale)
        opt.found_inf = torch.tensor(1.0 if step == skip_at else 0.0)
        before = [p.detach().clone() for p in params]
        opt.step()
        if step == skip_at:
            assert all(torch.equal(a, p) for a, p in zip(before, params))
            # no buffer has started: the next applied step is each parameter's first
            assert all(float(opt.state[p]["momentum_started"]) == 0 for p in params) or skip_at > 0
            continue
        want[0]["grads"] = grads
        _oracle_lars.lars_step(want)
    for p, q, state in zip(params, want[0]["params"], want[0]["state"]):
        close(p, q, tol, "parameter")
        close(opt.state[p]["momentum_buffer"], state["momentum_buffer"], tol, "buffer")
    assert {g.backend.name for g in opt._plan.groups} == {backend}


@pytest.mark.backends(reference=False)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_step_reads_nothing_on_the_host(backend, tensor_lr):
    params = _small(torch.float32)
    lr = torch.tensor(0.5) if tensor_lr else 0.5
    opt = LARS(params, **dict(OPTIONS, lr=lr, dampening=0.0, nesterov=True), backend=backend)
    opt.param_groups[0]["always_adapt"] = True
    _grads(0, params)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()  # builds the plan and the state; skipped, so the guarded steps below include the first
    before = [p.detach().clone() for p in params]
    with forbid_host_reads():
        for step in range(1, 4):
            _grads(step, params, 4.0)
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(float(step == 2))
            opt.step()
    assert not any(torch.equal(a, p) for a, p in zip(before, params))
    assert all(float(opt.state[p]["momentum_started"]) == 1 for p in params)
    assert {g.backend.name for g in opt._plan.groups} == {backend}


# ---------------------------------------------------------------- hyper-parameters

@pytest.mark.parametrize("bad", [
    dict(lr=-1.0), dict(lr=math.nan), dict(lr="0.1"), dict(momentum=-0.1), dict(momentum=math.inf),
    dict(dampening=math.nan), dict(weight_decay=-1e-4), dict(weight_decay=math.nan), dict(trust_coeff=-1.0),
    dict(eps=-1e-8), dict(eps=math.inf), dict(nesterov="yes"), dict(trust_clip=1), dict(always_adapt=None),
    dict(nesterov=True), dict(nesterov=True, momentum=0.9, dampening=0.1),
])
def test_invalid_hyper_parameters_raise_at_construction(bad):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError):
        LARS([p], backend="foreach", **bad)
    opt = LARS([p], backend="foreach")
    with pytest.raises(ValueError):
        opt.add_param_group(dict(bad, params=[nn.Parameter(torch.zeros(2))]))
    assert len(opt.param_groups) == 1


#: this package's own entries, after timm's (keyword-only in the signature)
OWN = {"stochastic_rounding": False}


def test_timms_signature_and_defaults():
    assert LARS_RULE.spec.defaults() == dict(_oracle_lars.DEFAULTS, **OWN)
    assert list(LARS_RULE.spec.names) == list(_oracle_lars.DEFAULTS) + list(OWN)
    bits = LARS_RULE.spec.bits
    assert (bits["nesterov"], bits["trust_clip"], bits["always_adapt"]) == (
        lars_flags.NESTEROV, lars_flags.TRUST_CLIP, lars_flags.ALWAYS_ADAPT)


def test_an_edited_group_is_checked_before_anything_changes():
    params = _small()
    opt = LARS(params, backend="foreach", **OPTIONS)
    _grads(0, params)
    opt.step()
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["weight_decay"] = -1.0
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))


def test_momentum_turned_on_and_off_by_a_schedule(backend):
    # The buffer exists only while momentum is not 0: turning it on rebuilds the plan and starts it.
    dtype, tol = dtype_and_tol(backend)
    params = _small(dtype)
    opt = LARS(params, lr=0.1, weight_decay=1e-2, backend=backend)
    want = [dict(lr=0.1, weight_decay=1e-2, params=[p.detach().double().clone() for p in params], grads=None,
                 state=[{} for _ in params])]
    for step, momentum in enumerate([0.0, 0.0, 0.9, 0.9, 0.0, 0.5]):
        opt.param_groups[0]["momentum"] = want[0]["momentum"] = momentum
        want[0]["grads"] = _grads(step, params)
        _oracle_lars.lars_step(want)
        opt.step()
        if step < 2:
            assert all(not opt.state[p] for p in params)
    for p, q, state in zip(params, want[0]["params"], want[0]["state"]):
        close(p, q, tol, "parameter")
        close(opt.state[p]["momentum_buffer"], state["momentum_buffer"], tol, "buffer")
    assert {g.backend.name for g in opt._plan.groups} == {backend}


# ---------------------------------------------------------------- checkpoints

def test_state_dict_round_trip(backend):
    params = _small(torch.bfloat16)
    opt = LARS(params, backend=backend, **OPTIONS)
    for step in range(3):
        _grads(step, params)
        opt.step()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    twin_params = copy.deepcopy(params)
    twin = LARS(twin_params, backend=backend, **OPTIONS)
    twin.load_state_dict(torch.load(saved, weights_only=True))
    for p, q in zip(params, twin_params):
        assert twin.state[q]["momentum_buffer"].dtype == torch.float32
        assert torch.equal(twin.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    for step in range(3, 6):
        _grads(step, params)
        _grads(step, twin_params)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], twin.state[q]["momentum_buffer"])


def test_a_timm_checkpoint_continues_its_buffers():
    # timm's Lars (and torch's SGD) save a started buffer and no flag: the next step is not a first one.
    params = _small()
    opt = LARS(params, backend="foreach", **OPTIONS)
    want = [dict(OPTIONS, params=[p.detach().clone() for p in params], grads=None, state=[{} for _ in params])]
    want[0]["grads"] = _grads(0, params)
    _oracle_lars.lars_step(want)
    theirs = {"state": {i: {"momentum_buffer": s["momentum_buffer"].clone()} for i, s in enumerate(want[0]["state"])},
              "param_groups": [dict(OPTIONS, nesterov=False, trust_coeff=0.001, eps=1e-8, always_adapt=False,
                                    params=[0, 1, 2])]}
    with torch.no_grad():
        for p, q in zip(params, want[0]["params"]):
            p.copy_(q)
    opt.load_state_dict(theirs)
    want[0]["grads"] = _grads(1, params)
    _oracle_lars.lars_step(want)
    opt.step()
    for p, q in zip(params, want[0]["params"]):
        close(p, q, TOL[torch.float64], "parameter")


# ---------------------------------------------------------------- monitoring

def test_monitoring_reports_the_norms_and_the_trust_ratio_the_step_used(backend):
    # group 0 adapts (weight decay), group 1 does not: its norms are measured for the monitor alone
    dtype, tol = dtype_and_tol(backend)
    params = _small(dtype)
    opt = LARS([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], backend=backend, monitor=True,
               **OPTIONS)
    scale = 4.0
    before = [p.detach().double().clone() for p in params]
    grads = _grads(0, params, scale)
    opt.grad_scale = torch.tensor(scale)
    opt.step()
    stats = opt.last_stats()
    assert len(stats) == 2
    for s, group in zip(stats, opt.param_groups):
        assert s.params == group["params"]
        idx = [next(i for i, q in enumerate(params) if q is p) for p in s.params]
        p_norm = torch.stack([before[i].norm() for i in idx])
        g_norm = torch.stack([grads[i].norm() for i in idx])
        close(s.p_norm, p_norm, tol, "p_norm")
        close(s.g_norm, g_norm, tol, "g_norm")
        ratio = torch.stack([_oracle_lars.trust_ratio(a, b, lr=OPTIONS["lr"], weight_decay=group["weight_decay"],
                                                      trust_coeff=group["trust_coeff"], eps=group["eps"],
                                                      trust_clip=group["trust_clip"])
                             if group["weight_decay"] != 0 else torch.ones((), dtype=torch.float64)
                             for a, b in zip(p_norm, g_norm)])
        close(s.trust_ratio, ratio, tol, "trust_ratio")
        close(s.local_lr, OPTIONS["lr"] * ratio, tol, "local_lr")
        assert set(s.per_parameter()) == set(s.params)
    assert not torch.equal(stats[0].trust_ratio, torch.ones_like(stats[0].trust_ratio))
    # a skipped step moved nothing: its local rates are 0
    _grads(1, params, scale)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(s.local_lr, torch.zeros_like(s.local_lr)) for s in opt.last_stats())
    opt.monitor = False
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert opt.last_stats() == []


@pytest.mark.parametrize("momentum", ["none", "heavy-ball", "nesterov"])
def test_monitoring_measures_the_change_of_each_tensor(backend, momentum):
    # ‖Δp‖/‖p‖ of each step (the buffer's update, the decay and the trust ratio in it): group 0
    # adapts, group 1 does not; a skipped step moved nothing
    dtype, tol = dtype_and_tol(backend)
    params = _small(dtype)
    options = dict(OPTIONS, momentum=0.0 if momentum == "none" else 0.9, nesterov=momentum == "nesterov")
    if momentum == "nesterov":
        options["dampening"] = 0.0
    opt = LARS([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], backend=backend, monitor=True,
               **options)
    scale = 4.0
    opt.grad_scale = torch.tensor(scale)
    for step in range(3):
        before = [p.detach().double().clone() for p in params]
        _grads(step, params, scale)
        opt.step()
        got = torch.cat([s.relative_change.double() for s in opt.last_stats()])
        order = [next(i for i, q in enumerate(params) if q is p) for s in opt.last_stats() for p in s.params]
        moved = torch.stack([(params[i].detach().double() - before[i]).norm() for i in order])
        p_norm = torch.stack([before[i].norm() for i in order])
        live = p_norm > 0
        assert live.sum() >= 2 and moved.any()
        close(got[live], moved[live] / p_norm[live], tol, "relative_change")
    _grads(3, params, scale)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(not s.relative_change.any() for s in opt.last_stats())


# ---------------------------------------------------------------- stochastic rounding

@pytest.mark.parametrize("options", [dict(OPTIONS), dict(lr=0.05)], ids=["momentum", "sgd"])
def test_stochastic_rounding_of_bf16_parameters(backend, options):
    # One step from the same bf16 values: every element lands on one of the two bf16 neighbours of the
    # exact result (one ulp), the rounding differs from rounding to nearest somewhere, one seed
    # gives the same bits twice and another seed other bits.
    def run(seed, rounding=True):
        params = _small(torch.bfloat16)
        opt = LARS(params, backend=backend, stochastic_rounding=rounding, seed=seed, **options)
        grads = _grads(0, params)
        want = [dict(options, params=[p.detach().double().clone() for p in params], grads=grads,
                     state=[{} for _ in params])]
        _oracle_lars.lars_step(want)
        opt.step()
        assert {g.backend.name for g in opt._plan.groups} == {backend}
        return [p.detach().clone() for p in params], want[0]["params"]

    assert_rounds_stochastically(run)
