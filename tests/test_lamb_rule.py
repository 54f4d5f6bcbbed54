"""LAMB as a rule on the engine, on every backend, against the float64 oracle (tests/_oracle_lamb.py,
itself held to timm's ``Lamb`` by test_lars_lamb_oracles.py).

Training runs feed the optimizer and the oracle the same gradients (the optimizer's model computes
them), with None and all-zero gradients on a schedule (a whole group has none on some steps, so its
step count advances without gradients) and zero-initialised tensors, and compare parameters,
moments and the groups' step counts: float64 on the Python backends (the kernels take float32,
bf16 and fp16), float32 and bf16 on all.
"""
import copy
import inspect
import io
import math

import pytest
import torch
from torch import nn

import _oracle_lamb
from _host_reads import forbid_host_reads
from _layerwise_models import MODELS, assert_rounds_stochastically, close, dtype_and_tol, gradients, hand, \
    make_model
from _param_split import split
from fromage_fused import backends
from fromage_fused.bench import external
from fromage_fused.rules.lamb import LAMB, LAMB_RULE
from fromage_fused.rules.lamb import flags as lamb_flags
from tolerances import ORACLE_TOL

STEPS = 200
CHECK_EVERY = 20
LR = 5e-3

#: (atol, rtol) per dtype, rtol relative to the tensor's largest magnitude. float64: 200 steps from
#: the same start (sums and products in another order than the oracle's, bias corrections as
#: -expm1(t ln β) on foreach). fp32 and bf16: one step from the optimizer's own values (the
#: trajectories of a rounding format drift apart); the moments of bf16 parameters are float32
#: state, so they are held to the float32 bound.
TOL = {
    torch.float64: ORACLE_TOL[torch.float64]["traj"],
    torch.float32: ORACLE_TOL[torch.float32]["step"],
    torch.bfloat16: ORACLE_TOL[torch.bfloat16]["step"],
}
STATE_TOL = {torch.float64: TOL[torch.float64], torch.float32: TOL[torch.float32], torch.bfloat16: TOL[torch.float32]}
#: a max_grad_norm the models' gradients exceed at most steps (the clipping is exercised)
CLIPS = 0.05

#: every boolean both ways, weight decay zero and not (group 1 never decays), max_grad_norm None,
#: the default and one that clips; as the oracle's parity grid against timm.
CASES = [
    dict(),
    dict(max_grad_norm=None),
    dict(max_grad_norm=CLIPS),
    dict(bias_correction=False),
    dict(grad_averaging=False),
    dict(trust_clip=True),
    dict(always_adapt=True),
    dict(caution=True, weight_decay=0.1),  # with a coupled decay: ‖u‖ from three sums
    dict(decoupled_decay=True, weight_decay=0.1),
    dict(decoupled_decay=True, corrected_weight_decay=True, weight_decay=0.1),
    dict(corrected_weight_decay=True),  # without decoupled_decay it changes nothing
    dict(weight_decay=0.0),  # Adam in one pass in both groups
    dict(weight_decay=0.0, always_adapt=True, trust_clip=True, caution=True),
    dict(betas=(0.0, 0.99), eps=1e-8, max_grad_norm=CLIPS),
    dict(caution=True, decoupled_decay=True, bias_correction=False, grad_averaging=False, max_grad_norm=CLIPS,
         always_adapt=True),
]


# ---------------------------------------------------------------- models, data, the harness

def _split_options(options):
    options = dict(options)
    return options, options.pop("max_grad_norm", _oracle_lamb.MAX_GRAD_NORM)


def _optimizer(ours, options, backend, lr=LR):
    options, max_grad_norm = _split_options(options)
    return LAMB([{"params": ours[0]}, {"params": ours[1], "weight_decay": 0.0}], lr=lr, max_grad_norm=max_grad_norm,
                backend=backend, **options)


def _oracle_groups(ours, options, lr=LR):
    options, _ = _split_options(options)
    groups = [dict(options, lr=lr, params=[p.detach().double().clone() for p in ps], grads=None,
                   state=[{} for _ in ps]) for ps in ours]
    groups[1]["weight_decay"] = 0.0
    return groups


def _compare(opt, ours, groups, tol, state_tol, where):
    for gi, (ps, group) in enumerate(zip(ours, groups)):
        assert float(opt.param_groups[gi]["step"]) == group["step"], f"{where}: group {gi} step count"
        for i, (p, q, state) in enumerate(zip(ps, group["params"], group["state"])):
            close(p, q, tol, f"{where}: group {gi} parameter {i}")
            mine = opt.state.get(p, {})
            assert set(mine) == set(state), f"{where}: group {gi} parameter {i} state keys"
            for key, value in state.items():
                close(mine[key], value, state_tol, f"{where}: group {gi} parameter {i} {key}")


# ---------------------------------------------------------------- float64 training against the oracle

@pytest.mark.usefixtures("one_thread")
@pytest.mark.backends(fused=False)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("options", CASES, ids=[str(i) for i in range(len(CASES))])
def test_float64_training_matches_the_oracle(backend, model_name, options):
    model = make_model(model_name, torch.float64)
    ours = split(model)
    opt = _optimizer(ours, options, backend)
    groups = _oracle_groups(ours, options)
    max_grad_norm = _split_options(options)[1]
    clipped = 0
    for step in range(STEPS):
        if step == STEPS // 2:
            for group in groups + opt.param_groups:
                group["lr"] = LR / 2
        hand(groups, gradients(model, ours, step, torch.float64), len(ours[0]))
        divisor = _oracle_lamb.clip_divisor(groups, max_grad_norm)
        clipped += divisor is not None and divisor > 1
        _oracle_lamb.lamb_step(groups, max_grad_norm=max_grad_norm, max_lr=LR)
        opt.step()
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            _compare(opt, ours, groups, TOL[torch.float64], STATE_TOL[torch.float64], f"{options} step {step}")
    assert {g.backend.name for g in opt._plan.groups} == {backend}
    if max_grad_norm == CLIPS:
        assert clipped > STEPS // 2  # the clipping was exercised


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("case", [0, 7, 9, 11, 14])
def test_low_precision_steps_match_the_oracle(backend, dtype, model_name, case):
    # Each step from the optimizer's own values: the oracle steps float64 copies of them, of the
    # moments and of the step counts, with the same gradients.
    options = CASES[case]
    model = make_model(model_name, dtype)
    ours = split(model)
    opt = _optimizer(ours, options, backend)
    max_grad_norm = _split_options(options)[1]
    for step in range(20):
        groups = _oracle_groups(ours, options)
        for gi, (ps, group) in enumerate(zip(ours, groups)):
            group["step"] = int(opt.param_groups[gi].get("step", 0))
            for p, state in zip(ps, group["state"]):
                for key, value in opt.state.get(p, {}).items():
                    assert value.dtype == torch.float32  # float32 state for bf16 too
                    state[key] = value.double().clone()
        hand(groups, gradients(model, ours, step, dtype), len(ours[0]))
        _oracle_lamb.lamb_step(groups, max_grad_norm=max_grad_norm, max_lr=LR)
        opt.step()
        _compare(opt, ours, groups, TOL[dtype], STATE_TOL[dtype], f"{dtype} {options} step {step}")
    assert {g.backend.name for g in opt._plan.groups} == {backend}


# ---------------------------------------------------------------- every backend

#: 4 steps from the same start: float32 as the oracle tolerances say; float16 rounds every step
#: (half an ulp, 2**-11 relative, each time) and its trust ratios follow the rounded values.
FUSED_TRAJ_TOL = {torch.float32: ORACLE_TOL[torch.float32]["traj"], torch.float16: (1e-3, 2 ** -8)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", [dict(weight_decay=1e-2, caution=True, max_grad_norm=0.5),
                                     dict(weight_decay=1e-2, decoupled_decay=True, trust_clip=True),
                                     dict(weight_decay=0.0, caution=True, max_grad_norm=None),
                                     dict(weight_decay=0.0, bias_correction=False)],
                         ids=["caution-clipped", "decoupled", "caution-not-adapting", "adam"])
def test_every_backend_steps_lamb(backend, dtype, options):
    if backend not in ("reference", "foreach"):
        assert backends.get(backend).has_rule(LAMB_RULE)
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (5,), (3, 3), (40_000,)]  # the last one is several chunks of every kernel
    start = [torch.randn(s, generator=gen) for s in shapes]
    start[1].zero_()
    params = [nn.Parameter(x.to(dtype)) for x in start]
    opt = LAMB(params, lr=0.01, backend=backend, **options)
    max_grad_norm = options.get("max_grad_norm", 1.0)
    oracle = {k: v for k, v in options.items() if k != "max_grad_norm"}
    want = [dict(params=[p.detach().double().clone() for p in params], grads=None, state=[{} for _ in params],
                 lr=0.01, **oracle)]
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if step == 1:
            grads[2].zero_()
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        want[0]["grads"] = [p.grad.double() for p in params]
        _oracle_lamb.lamb_step(want, max_grad_norm=max_grad_norm, max_lr=0.01)
        opt.step()
    assert {g.backend.name for g in opt._plan.groups} == {backend}
    for i, (p, q) in enumerate(zip(params, want[0]["params"])):
        close(p, q, FUSED_TRAJ_TOL[dtype], f"parameter {i}")


# ---------------------------------------------------------------- loss scaling, host reads, gradients

def _small(dtype=torch.float64):
    gen = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in [(5, 3), (4,), (2, 2), (3,)]]
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


#: group 0 adapts with every option that needs a sum; group 1 is Adam in one pass
OPTIONS = dict(lr=0.05, weight_decay=0.1, caution=True, decoupled_decay=True, corrected_weight_decay=True,
               trust_clip=True, max_grad_norm=0.5)


def _two_groups(params, backend, lr=OPTIONS["lr"]):
    return LAMB([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "caution": False}],
                backend=backend, **dict(OPTIONS, lr=lr))


def _want(params):
    options, _ = _split_options(OPTIONS)
    groups = [dict(options, params=[p.detach().double().clone() for p in params[:3]]),
              dict(options, weight_decay=0.0, caution=False, params=[p.detach().double().clone() for p in params[3:]])]
    for g in groups:
        g["grads"], g["state"] = None, [{} for _ in g["params"]]
    return groups


def _oracle_step(want, grads, **kw):
    want[0]["grads"], want[1]["grads"] = grads[:3], grads[3:]
    _oracle_lamb.lamb_step(want, max_grad_norm=OPTIONS["max_grad_norm"], max_lr=OPTIONS["lr"], **kw)


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state},
            [g["step"].clone() if isinstance(g.get("step"), torch.Tensor) else g.get("step") for g in opt.param_groups])


def _assert_unchanged(before, after):
    (p0, s0, c0), (p1, s1, c1) = before, after
    assert all(torch.equal(a, b) for a, b in zip(p0, p1)), "a parameter changed"
    for i in s0:
        assert all(torch.equal(s0[i][k], s1[i][k]) for k in s0[i]), f"the state of parameter {i} changed"
    # (a count that did not exist yet is created at 0 by the plan of a skipped first step)
    assert [0.0 if c is None else float(c) for c in c0] == [float(c) for c in c1], "a step count changed"


@pytest.mark.parametrize("skip_at", [0, 3])
def test_found_inf_skips_the_step_and_grad_scale_divides(backend, skip_at):
    dtype, tol = dtype_and_tol(backend)
    params = _small(dtype)
    opt = _two_groups(params, backend)
    want = _want(params)
    scale = 2.0 ** 10  # a power of two: unscaling is exact
    for step in range(6):
        grads = _grads(step, params, scale)
        opt.grad_scale = torch.tensor(scale)
        opt.found_inf = torch.tensor(1.0 if step == skip_at else 0.0)
        before = _snapshot(opt, params)
        opt.step()
        if step == skip_at:
            _assert_unchanged(before, _snapshot(opt, params))
            continue
        _oracle_step(want, grads)
    for gi, group in enumerate(want):
        assert float(opt.param_groups[gi]["step"]) == group["step"] == 5
    for p, q, state in zip(params, want[0]["params"] + want[1]["params"], want[0]["state"] + want[1]["state"]):
        close(p, q, tol, "parameter")
        for key in ("exp_avg", "exp_avg_sq"):
            close(opt.state[p][key], state[key], tol, key)
    assert {g.backend.name for g in opt._plan.groups} == {backend}


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
def test_a_tensor_lr_edited_to_an_unusable_value_skips_the_step(backend, bad):
    dtype, _ = dtype_and_tol(backend)
    params = _small(dtype)
    opt = _two_groups(params, backend, lr=torch.tensor(OPTIONS["lr"], dtype=dtype))
    _grads(0, params)
    opt.step()
    opt.param_groups[0]["lr"] = torch.full((), bad, dtype=dtype)  # (group 1 keeps the constructor's)
    _grads(1, params)
    before = _snapshot(opt, params)
    opt.step()
    after = _snapshot(opt, params)
    # the whole group is skipped, its count included; group 1 (a usable lr) steps
    assert all(torch.equal(a, b) for a, b in zip(before[0][:3], after[0][:3]))
    assert torch.equal(before[2][0], after[2][0]) and float(after[2][1]) == 2
    assert not torch.equal(before[0][3], after[0][3])


@pytest.mark.backends(reference=False)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_step_reads_nothing_on_the_host(backend, tensor_lr):
    params = _small(torch.float32)
    lr = torch.tensor(OPTIONS["lr"]) if tensor_lr else OPTIONS["lr"]
    opt = _two_groups(params, backend, lr=lr)
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
    assert [float(g["step"]) for g in opt.param_groups] == [2, 2]
    flags = [LAMB_RULE.flags(g.values, False) for g in opt._plan.groups]
    assert flags[0] & lamb_flags.NORMS and flags[0] & lamb_flags.CAUTION and flags[1] & lamb_flags.PLAIN
    assert {g.backend.name for g in opt._plan.groups} == {backend}


def test_gradients_are_not_modified(backend):
    # timm <= 1.0.30 divided p.grad in place by the clip factor; this LAMB never writes a gradient.
    params = _small(dtype_and_tol(backend)[0])
    opt = _two_groups(params, backend)
    for step in range(3):
        _grads(step, params, 8.0)
        kept = [p.grad.clone() for p in params]
        opt.grad_scale = torch.tensor(8.0)
        opt.step()
        assert all(torch.equal(p.grad, k) for p, k in zip(params, kept))
    assert _oracle_lamb.clip_divisor([dict(grads=kept)], OPTIONS["max_grad_norm"], 8.0) > 1  # it clipped


# ---------------------------------------------------------------- hyper-parameters

BAD = [
    dict(lr=-1.0), dict(lr=math.nan), dict(lr="0.1"), dict(betas=(0.9,)), dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, math.nan)), dict(betas=(-0.1, 0.999)), dict(betas="ab"), dict(eps=-1e-6), dict(eps=math.inf),
    dict(weight_decay=-1e-4), dict(weight_decay=math.nan), dict(max_grad_norm=0.0), dict(max_grad_norm=-1.0),
    dict(max_grad_norm=math.nan), dict(max_grad_norm=math.inf), dict(max_grad_norm="1"),
    dict(bias_correction="yes"), dict(grad_averaging=1), dict(trust_clip=1), dict(always_adapt=None),
    dict(caution="no"), dict(decoupled_decay=0), dict(corrected_weight_decay=1),
]


@pytest.mark.parametrize("bad", BAD)
def test_invalid_hyper_parameters_raise_at_construction(bad):
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError):
        LAMB([p], backend="foreach", **bad)
    opt = LAMB([p], backend="foreach")
    with pytest.raises(ValueError):
        opt.add_param_group(dict(bad, params=[nn.Parameter(torch.zeros(2))]))
    assert len(opt.param_groups) == 1


def test_corrected_weight_decay_needs_a_positive_constructor_lr():
    # timm's check: the snapshot of the constructor's lr is what it divides by (a group's own lr is not).
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="corrected_weight_decay"):
        LAMB([p], lr=0.0, corrected_weight_decay=True, backend="foreach")
    opt = LAMB([p], lr=0.1, backend="foreach")
    opt.add_param_group(dict(params=[nn.Parameter(torch.zeros(2))], lr=0.0, corrected_weight_decay=True))
    assert opt.param_groups[1]["max_lr_snapshot"] == 0.1
    for bad in [dict(corrected_weight_decay=True, max_lr_snapshot=0.0), dict(max_lr_snapshot=-1.0),
                dict(max_lr_snapshot=math.nan)]:
        with pytest.raises(ValueError, match="max_lr_snapshot"):
            opt.add_param_group(dict(bad, params=[nn.Parameter(torch.zeros(2))]))
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("foreach", [True, False])
def test_timms_foreach_argument_is_refused_but_none(foreach):
    p = nn.Parameter(torch.zeros(3))
    LAMB([p], foreach=None, backend="foreach")
    with pytest.raises(ValueError, match="backend"):
        LAMB([p], foreach=foreach, backend="foreach")


def test_max_grad_norm_is_one_value_for_every_group():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="all param groups"):
        LAMB([{"params": [a]}, {"params": [b], "max_grad_norm": 5.0}], backend="foreach")
    opt = LAMB([{"params": [a]}, {"params": [b], "max_grad_norm": 1.0}], backend="foreach")  # the same value: fine
    assert [g["max_grad_norm"] for g in opt.param_groups] == [1.0, 1.0]
    opt = LAMB([a], max_grad_norm=None, backend="foreach")
    opt.add_param_group({"params": [b]})
    assert opt.param_groups[1]["max_grad_norm"] is None


def test_timms_signature_and_defaults():
    theirs = dict(_oracle_lamb.DEFAULTS, max_grad_norm=_oracle_lamb.MAX_GRAD_NORM)
    own = ("backend", "monitor", "stochastic_rounding", "seed")  # this package's, keyword-only
    mine = {k: v.default for k, v in inspect.signature(LAMB).parameters.items() if k not in ("params",) + own}
    assert mine == dict(theirs, foreach=None)
    assert LAMB_RULE.spec.defaults() == dict(theirs, max_lr_snapshot=1e-3, stochastic_rounding=False)
    assert all(inspect.signature(LAMB).parameters[k].kind is inspect.Parameter.KEYWORD_ONLY for k in own)
    assert inspect.signature(LAMB).parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    try:
        timm_lamb = external.timm_optimizers()[1]
    except external.Unavailable:
        timm_lamb = None
    if timm_lamb is not None:  # the order too
        names = [k for k in inspect.signature(timm_lamb).parameters]
        assert [k for k in inspect.signature(LAMB).parameters if k not in own] == names
        assert {k: v.default for k, v in inspect.signature(timm_lamb).parameters.items() if k != "params"} == mine
    bits = LAMB_RULE.spec.bits
    assert [bits[k] for k in ("bias_correction", "grad_averaging", "trust_clip", "always_adapt", "caution",
                              "decoupled_decay", "corrected_weight_decay")] == [
        lamb_flags.BIAS_CORRECTION, lamb_flags.GRAD_AVERAGING, lamb_flags.TRUST_CLIP, lamb_flags.ALWAYS_ADAPT,
        lamb_flags.CAUTION, lamb_flags.DECOUPLED_DECAY, lamb_flags.CORRECTED_WEIGHT_DECAY]
    assert LAMB_RULE.spec.slots["lr"] == 0  # (foreach.LR)


def test_max_lr_snapshot_is_the_constructors_lr():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    opt = LAMB([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=torch.tensor(0.25), backend="foreach")
    assert [g["max_lr_snapshot"] for g in opt.param_groups] == [0.25, 0.25]
    assert all(type(g["max_lr_snapshot"]) is float for g in opt.param_groups)


def test_passes_read_and_write_what_the_rule_declares():
    # The bytes the rule's docstring counts: which lists each pass touches under typical flags.
    def lists(values):
        flags = LAMB_RULE.flags(dict(LAMB_RULE.spec.defaults(), **values), False)
        return [(spec.name, *spec.lists_for(flags)) for spec in LAMB_RULE.passes if spec.runs(flags)]

    assert lists({}) == [("grad_norm", ("g",), 0), ("moments", ("exp_avg", "exp_avg_sq", "p", "g"), 2),
                         ("apply", ("p", "exp_avg", "exp_avg_sq"), 1)]
    assert lists(dict(caution=True, max_grad_norm=None)) == [
        ("moments", ("exp_avg", "exp_avg_sq", "p", "g"), 2), ("apply", ("p", "exp_avg", "exp_avg_sq", "g"), 1)]
    assert lists(dict(weight_decay=0.0, max_grad_norm=None)) == [("adam", ("p", "exp_avg", "exp_avg_sq", "g"), 3)]
    assert lists(dict(weight_decay=0.0, caution=True, max_grad_norm=None)) == [
        ("moments", ("exp_avg", "exp_avg_sq", "g"), 2), ("apply", ("p", "exp_avg", "exp_avg_sq", "g"), 1)]


@pytest.mark.parametrize("edit", [dict(weight_decay=-1.0), dict(betas=(0.9, 1.0)), dict(max_grad_norm=5.0),
                                  dict(max_grad_norm=None), dict(corrected_weight_decay=True, max_lr_snapshot=0.0)])
def test_an_edited_group_is_checked_before_anything_changes(edit):
    params = _small()
    opt = _two_groups(params, "foreach")
    _grads(0, params)
    opt.step()
    before = _snapshot(opt, params)
    opt.param_groups[1].update(edit)
    _grads(1, params)
    with pytest.raises(ValueError, match="|".join(edit)):
        opt.step()
    _assert_unchanged(before, _snapshot(opt, params))


# ---------------------------------------------------------------- checkpoints

def test_state_dict_round_trip(backend):
    params = _small(torch.bfloat16)
    opt = _two_groups(params, backend)
    for step in range(3):
        _grads(step, params)
        opt.step()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    twin_params = copy.deepcopy(params)
    twin = LAMB([{"params": twin_params[:3]}, {"params": twin_params[3:]}], backend=backend)
    twin.load_state_dict(torch.load(saved, weights_only=True))
    for p, q in zip(params, twin_params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert twin.state[q][key].dtype == torch.float32
            assert torch.equal(twin.state[q][key], opt.state[p][key])
    for mine, theirs in zip(opt.param_groups, twin.param_groups):
        assert {k: v for k, v in mine.items() if k not in ("params", "step")} == \
            {k: v for k, v in theirs.items() if k not in ("params", "step")}
        assert float(theirs["step"]) == float(mine["step"]) == 3
    for step in range(3, 6):
        _grads(step, params)
        _grads(step, twin_params)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], twin.state[q]["exp_avg_sq"])
    assert twin.param_groups[0]["step"].dtype == torch.float32 and float(twin.param_groups[0]["step"]) == 6


def test_a_state_dict_whose_groups_disagree_on_max_grad_norm_is_refused():
    params = _small()
    opt = _two_groups(params, "foreach")
    _grads(0, params)
    opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["param_groups"][1]["max_grad_norm"] = 2.0
    before = _snapshot(opt, params)
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.load_state_dict(state_dict)
    assert opt.param_groups[1]["max_grad_norm"] == OPTIONS["max_grad_norm"]
    _assert_unchanged(before, _snapshot(opt, params))


def _timm_checkpoint(want, step_form):
    """What timm's Lamb saves after the oracle's steps: its groups hold every hyper-parameter, the
    snapshot, foreach and the step count (an int up to timm 1.0.27, a float32 CPU tensor since)."""
    count = want[0]["step"]
    step = count if step_form == "int" else torch.tensor(float(count))
    state, ids = {}, 0
    groups = []
    for g in want:
        hyper = dict(_oracle_lamb.DEFAULTS, **{k: v for k, v in g.items() if k in _oracle_lamb.DEFAULTS})
        groups.append(dict(hyper, max_grad_norm=OPTIONS["max_grad_norm"], max_lr_snapshot=OPTIONS["lr"],
                           foreach=None, step=step, params=list(range(ids, ids + len(g["params"])))))
        for s in g["state"]:
            state[ids] = {k: v.clone() for k, v in s.items()}
            ids += 1
    return {"state": state, "param_groups": groups}


@pytest.mark.backends(fused=False)
@pytest.mark.parametrize("step_form", ["int", "tensor"])
def test_a_timm_checkpoint_continues(backend, step_form):
    params = _small()
    opt = _two_groups(params, backend)
    want = _want(params)
    for step in range(3):
        _oracle_step(want, _grads(step, params))
    checkpoint = _timm_checkpoint(want, step_form)
    saved = io.BytesIO()
    torch.save(checkpoint, saved)
    saved.seek(0)
    with torch.no_grad():
        for p, q in zip(params, want[0]["params"] + want[1]["params"]):
            p.copy_(q)
    loaded = torch.load(saved, weights_only=True)
    opt.load_state_dict(loaded)
    for step in range(3, 6):
        _oracle_step(want, _grads(step, params))
        opt.step()
    for gi, g in enumerate(opt.param_groups):
        assert isinstance(g["step"], torch.Tensor) and g["step"].dtype == torch.float32 and float(g["step"]) == 6
    for p, q, state in zip(params, want[0]["params"] + want[1]["params"], want[0]["state"] + want[1]["state"]):
        close(p, q, TOL[torch.float64], "parameter")
        close(opt.state[p]["exp_avg"], state["exp_avg"], TOL[torch.float64], "exp_avg")
    assert loaded["param_groups"][0]["step"] == 3  # the loaded dict itself is not advanced


def test_a_checkpoint_of_timms_lamb_continues_as_timm_does():
    try:
        timm_lamb = external.timm_optimizers()[1]
    except external.Unavailable as exc:
        pytest.skip(f"timm's Lamb is not available: {exc}")
    params = _small()
    twin = copy.deepcopy(params)
    options, max_grad_norm = _split_options(OPTIONS)
    theirs = timm_lamb([{"params": twin[:3]}, {"params": twin[3:], "weight_decay": 0.0, "caution": False}],
                       max_grad_norm=max_grad_norm, **options)
    for step in range(3):
        for p, g in zip(twin, _grads(step, params)):
            p.grad = g.clone()
        theirs.step()
    opt = _two_groups(params, "foreach")
    with torch.no_grad():
        for p, q in zip(params, twin):
            p.copy_(q)
    opt.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for step in range(3, 6):
        for p, g in zip(twin, _grads(step, params)):
            p.grad = g.clone()
        theirs.step()
        opt.step()
    for p, q in zip(params, twin):
        close(p, q.detach(), TOL[torch.float64], "parameter")
        close(opt.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], TOL[torch.float64], "exp_avg_sq")
    assert [float(g["step"]) for g in opt.param_groups] == [float(g["step"]) for g in theirs.param_groups] == [6, 6]


# ---------------------------------------------------------------- monitoring

def test_monitoring_reports_what_the_step_measured(backend):
    # group 0 adapts with caution and a coupled decay; group 1 runs as Adam (weight decay 0): only
    # its gradient norms are measured. No max_grad_norm: the monitor runs the global-norm pass.
    dtype, tol = dtype_and_tol(backend)
    params = _small(dtype)
    opt = LAMB([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "caution": False}], lr=0.05,
               weight_decay=0.1, caution=True, max_grad_norm=None, backend=backend, monitor=True)
    scale = 4.0
    before = [p.detach().double().clone() for p in params]
    grads = _grads(0, params, scale)
    opt.grad_scale = torch.tensor(scale)
    opt.step()
    stats = opt.last_stats()
    assert len(stats) == 2
    first, second = stats
    close(first.g_norm, torch.stack([g.norm() for g in grads[:3]]), tol, "g_norm")
    close(second.g_norm, torch.stack([g.norm() for g in grads[3:]]), tol, "g_norm")
    close(first.p_norm, torch.stack([p.norm() for p in before[:3]]), tol, "p_norm")
    moved = torch.stack([(p.detach().double() - q).norm() for p, q in zip(params[:3], before[:3])])
    p_norm = torch.stack([p.norm() for p in before[:3]])
    relative = torch.where(p_norm > 0, moved / p_norm.clamp(min=1e-300), torch.zeros_like(moved))
    finite = p_norm > 0
    close(first.relative_change[finite], relative[finite], tol, "relative_change")
    # the update's norm times the ratio times lr is how far each tensor moved
    close(0.05 * first.trust_ratio * first.update_norm, moved, tol, "lr * r * ||u||")
    assert torch.isnan(second.p_norm).all() and torch.equal(second.trust_ratio, torch.ones_like(second.trust_ratio))
    assert set(first.per_parameter()) == set(params[:3])
    opt.found_inf = torch.tensor(1.0)
    _grads(1, params, scale)
    opt.step()
    assert torch.equal(opt.last_stats()[0].relative_change, torch.zeros(3, dtype=opt.last_stats()[0].p_norm.dtype))
    opt.monitor = False
    opt.step()
    assert opt.last_stats() == []


@pytest.mark.parametrize("caution", [False, True], ids=["plain", "caution"])
@pytest.mark.parametrize("corrected", [False, True], ids=["lr", "corrected"])
def test_monitoring_with_a_decoupled_decay_measures_the_change_of_p(backend, caution, corrected):
    # Δp = −(decay·p + lr·r·u): its norm needs ⟨u, p⟩, which the moments pass sums for the monitor
    dtype, tol = dtype_and_tol(backend)
    params = _small(dtype)
    opt = LAMB(params, lr=0.05, weight_decay=0.5, decoupled_decay=True, corrected_weight_decay=corrected,
               caution=caution, backend=backend, monitor=True)
    for step in range(2):
        before = [p.detach().double().clone() for p in params]
        _grads(step, params)
        opt.step()
        (stats,) = opt.last_stats()
        moved = torch.stack([(p.detach().double() - q).norm() for p, q in zip(params, before)])
        p_norm = torch.stack([q.norm() for q in before])
        live = p_norm > 0
        assert live.sum() >= 3
        close(stats.relative_change[live], moved[live] / p_norm[live], tol, "relative_change")


# ---------------------------------------------------------------- stochastic rounding

def test_stochastic_rounding_of_bf16_parameters(backend):
    # One step from the same bf16 values (group 1 runs as Adam: with stochastic rounding, through the
    # moments and update passes): every element lands on one of the two bf16 neighbours of the exact
    # result (one ulp), the rounding differs from rounding to nearest somewhere, one seed gives the
    # same bits twice and another seed other bits.
    def run(seed, rounding=True):
        params = _small(torch.bfloat16)
        opt = LAMB([{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0, "caution": False}],
                   backend=backend, stochastic_rounding=rounding, seed=seed, **OPTIONS)
        grads = _grads(0, params)
        want = _want(params)
        _oracle_step(want, grads)
        opt.step()
        assert {g.backend.name for g in opt._plan.groups} == {backend}
        return [p.detach().clone() for p in params], want[0]["params"] + want[1]["params"]

    assert_rounds_stochastically(run)
