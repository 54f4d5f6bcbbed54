"""The float64 LARS and LAMB oracles against timm's ``Lars`` and ``Lamb``, and their own contract.

Parity: 200 steps of real training on scikit-learn's digits (a convnet with batch norms, an MLP, a
small transformer), in float64, two param groups (the second without weight decay, as training
recipes exclude biases and norms), the learning rate halved half-way, and a gradient schedule with
None gradients (one parameter's first gradient comes late, a whole group has none on some steps)
and all-zero gradients; zero-initialised tensors (batch-norm and attention biases, a zero output
layer, a zero position table). Each step the oracle's model computes the gradients; timm steps a
deep copy with its own copies of them. Parameters, state and LAMB's step counts must agree to
TIMM_PARITY_TOL throughout, for a grid in which every boolean option is taken both ways and weight
decay is zero and non-zero. timm is loaded from its installed files (fromage_fused.bench.external);
where it is not installed these tests skip and say what to install.
"""
import copy
import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _oracle_lamb
import _oracle_lars
from _param_split import schedule, split
from fromage_fused.bench import external
from tolerances import TIMM_PARITY_TOL

STEPS = 200
CHECK_EVERY = 10


@pytest.fixture(scope="module")
def timm_classes():
    try:
        return external.timm_optimizers()
    except external.Unavailable as exc:
        if os.environ.get("CI"):  # CI installs timm (the Makefile's test stamp): its absence is a failure there
            raise
        pytest.skip(f"timm's Lars/Lamb are not available: {exc}")


# ---------------------------------------------------------------- models and data

@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _convnet():
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10),
    )


def _mlp():
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.zeros_(model[4].weight)  # a zero-initialised output layer: ‖p‖ = 0 at first
    nn.init.zeros_(model[2].bias)
    return model


class _Transformer(nn.Module):
    """The digit's 8 rows as 8 tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.position = nn.Parameter(torch.zeros(8, 16))
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.embed(x.view(-1, 8, 8)) + self.position
        return self.head(self.block(h).mean(1))


MODELS = {"convnet": _convnet, "mlp": _mlp, "transformer": _Transformer}


def _model(name):
    torch.manual_seed(1)
    return MODELS[name]().double()




# ---------------------------------------------------------------- the parity harness

def _assert_close(got, want, what):
    atol, rtol = TIMM_PARITY_TOL
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _run(kind, timm_cls, model_name, digits, options, *, lr, foreach=None, steps=STEPS):
    x_all, y_all = digits
    model = _model(model_name)
    twin = copy.deepcopy(model)
    mine, theirs = split(model), split(twin)
    options = dict(options)
    max_grad_norm = options.pop("max_grad_norm", _oracle_lamb.MAX_GRAD_NORM)
    no_decay = {"weight_decay": 0.0}
    extra = {"max_grad_norm": max_grad_norm} if kind == "lamb" else {}
    opt = timm_cls([{"params": theirs[0]}, {"params": theirs[1], **no_decay}], lr=lr, foreach=foreach, **options,
                   **extra)
    groups = [dict(options, lr=lr, params=[p.data for p in ps], grads=None, state=[{} for _ in ps]) for ps in mine]
    groups[1].update(no_decay)
    group_of = [0] * len(mine[0]) + [1] * len(mine[1])
    flat_theirs = theirs[0] + theirs[1]
    batch = 64
    for step in range(steps):
        if step == steps // 2:
            for group in groups + opt.param_groups:
                group["lr"] = lr / 2
        start = step * batch % (len(y_all) - batch)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_all[start:start + batch]), y_all[start:start + batch]).backward()
        grads = schedule([p.grad for p in mine[0] + mine[1]], step, group_of)
        groups[0]["grads"], groups[1]["grads"] = grads[:len(mine[0])], grads[len(mine[0]):]
        for p, g in zip(flat_theirs, grads):
            p.grad = None if g is None else g.clone()
        kept = [None if g is None else g.clone() for g in grads]
        if kind == "lars":
            _oracle_lars.lars_step(groups)
        else:
            _oracle_lamb.lamb_step(groups, max_grad_norm=max_grad_norm, max_lr=lr)
        opt.step()
        for g, k in zip(grads, kept):
            assert (g is None) == (k is None) and (g is None or torch.equal(g, k)), "the oracle changed a gradient"
        if step % CHECK_EVERY == CHECK_EVERY - 1 or step == steps - 1:
            _compare(kind, opt, groups, f"{kind} {model_name} {options} step {step}")
    assert all(torch.isfinite(p).all() for ps in mine for p in ps)


def _compare(kind, opt, groups, where):
    for gi, (theirs, mine) in enumerate(zip(opt.param_groups, groups)):
        if kind == "lamb":
            assert float(theirs["step"]) == mine["step"], f"{where}: group {gi} step count"
        for i, (p, q, state) in enumerate(zip(theirs["params"], mine["params"], mine["state"])):
            _assert_close(p.detach(), q, f"{where}: group {gi} parameter {i}")
            their_state = opt.state.get(p, {})
            assert set(their_state) == set(state), f"{where}: group {gi} parameter {i} state keys"
            for key, value in state.items():
                _assert_close(their_state[key], value, f"{where}: group {gi} parameter {i} {key}")


def _supported(timm_cls, options):
    known = inspect.signature(timm_cls).parameters
    missing = [k for k in options if k not in known]
    if missing:
        pytest.skip(f"the installed timm ({external.timm_version()}) has no {missing}")


# ---------------------------------------------------------------- LARS

#: (options, lr): every boolean both ways, weight decay zero and not (group 1 never decays).
LARS_CASES = [
    (dict(weight_decay=1e-4, momentum=0.9), 1.0),
    (dict(weight_decay=1e-4, momentum=0.9, nesterov=True), 1.0),
    (dict(weight_decay=1e-4, momentum=0.9, dampening=0.5), 1.0),
    (dict(weight_decay=5e-4, momentum=0.9, trust_clip=True, trust_coeff=0.02), 0.02),
    (dict(weight_decay=1e-4, momentum=0.9, always_adapt=True, trust_clip=True, nesterov=True, eps=1e-3), 0.5),
    (dict(weight_decay=5e-4), 1.0),
    (dict(weight_decay=0.0, momentum=0.9, always_adapt=True), 1.0),
    (dict(weight_decay=0.0, momentum=0.9), 0.05),
    (dict(), 0.05),
    (dict(weight_decay=1e-4, always_adapt=True, trust_clip=True), 2.0),  # lr > 1: clipped ratio of 1 is 1/lr
]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("options,lr", LARS_CASES, ids=[str(i) for i in range(len(LARS_CASES))])
def test_lars_oracle_matches_timm(timm_classes, digits, one_thread, model_name, options, lr):
    _run("lars", timm_classes[0], model_name, digits, options, lr=lr)


@pytest.mark.parametrize("case", [0, 1, 4])
def test_lars_oracle_matches_timms_foreach_path(timm_classes, digits, one_thread, case):
    # timm's multi-tensor path, its default on CUDA tensors.
    options, lr = LARS_CASES[case]
    _run("lars", timm_classes[0], "mlp", digits, options, lr=lr, foreach=True)


# ---------------------------------------------------------------- LAMB

LAMB_CASES = [
    dict(),
    dict(max_grad_norm=None),
    dict(max_grad_norm=0.05),
    dict(bias_correction=False),
    dict(grad_averaging=False),
    dict(trust_clip=True),
    dict(always_adapt=True),
    dict(caution=True),
    dict(decoupled_decay=True, weight_decay=0.1),
    dict(decoupled_decay=True, corrected_weight_decay=True, weight_decay=0.1),
    dict(corrected_weight_decay=True),  # without decoupled_decay it changes nothing
    dict(weight_decay=0.0),
    dict(weight_decay=0.0, always_adapt=True, trust_clip=True, caution=True),
    dict(betas=(0.0, 0.99), eps=1e-8, max_grad_norm=0.05),
    dict(caution=True, decoupled_decay=True, bias_correction=False, grad_averaging=False, max_grad_norm=0.05,
         always_adapt=True),
]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("options", LAMB_CASES, ids=[str(i) for i in range(len(LAMB_CASES))])
def test_lamb_oracle_matches_timm(timm_classes, digits, one_thread, model_name, options):
    _supported(timm_classes[1], options)
    _run("lamb", timm_classes[1], model_name, digits, options, lr=5e-3)


@pytest.mark.parametrize("case", [0, 7, 9, 14])
def test_lamb_oracle_matches_timms_foreach_path(timm_classes, digits, one_thread, case):
    # timm's multi-tensor path folds the bias corrections into scalars: equal in exact arithmetic.
    _supported(timm_classes[1], LAMB_CASES[case])
    _run("lamb", timm_classes[1], "transformer", digits, LAMB_CASES[case], lr=5e-3, foreach=True)


# ---------------------------------------------------------------- defaults and single edges

@pytest.mark.parametrize("which", ["lars", "lamb"])
def test_oracle_defaults_are_timms(timm_classes, which):
    cls = timm_classes[0] if which == "lars" else timm_classes[1]
    oracle = _oracle_lars if which == "lars" else _oracle_lamb
    theirs = {k: v.default for k, v in inspect.signature(cls).parameters.items() if k not in ("params", "foreach")}
    mine = dict(oracle.DEFAULTS)
    if which == "lamb":
        mine["max_grad_norm"] = oracle.MAX_GRAD_NORM
    assert {k: v for k, v in theirs.items() if k in mine} == mine
    assert set(mine) <= set(theirs)


def test_lars_zero_norm_ratio_with_trust_clip_is_one_over_lr(timm_classes):
    # A zero tensor: ratio 1, then LARC's min(1/lr, 1) = 1/2 at lr 2, so the step is -lr·g/2 = -g.
    g = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    p.grad = g.clone()
    timm_classes[0]([p], lr=2.0, weight_decay=0.1, trust_clip=True).step()
    q = torch.zeros(3, dtype=torch.float64)
    _oracle_lars.lars_step([dict(params=[q], grads=[g], state=[{}], lr=2.0, weight_decay=0.1, trust_clip=True)])
    torch.testing.assert_close(p.detach(), -g, atol=0, rtol=0)
    torch.testing.assert_close(q, -g, atol=0, rtol=0)


def test_lamb_late_parameter_uses_its_groups_step_count(timm_classes):
    # b has no gradient at step 1: its first update is bias-corrected with the group's t = 2.
    a = torch.ones(2, dtype=torch.float64, requires_grad=True)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = timm_classes[1]([a, b], lr=0.1, weight_decay=0.0, max_grad_norm=None)
    a.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    b.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    c1, c2 = 1 - 0.9 ** 2, 1 - 0.999 ** 2
    update = (0.1 / c1) / ((0.001 ** 0.5) / c2 ** 0.5 + 1e-6)
    torch.testing.assert_close(b.detach(), torch.full((2,), 1 - 0.1 * update, dtype=torch.float64), atol=1e-15, rtol=0)
    assert float(opt.param_groups[0]["step"]) == 2
    groups = [dict(params=[torch.ones(2, dtype=torch.float64)], grads=[None], state=[{}], lr=0.1, weight_decay=0.0)]
    _oracle_lamb.lamb_step(groups, max_grad_norm=None)
    groups[0]["grads"] = [torch.ones(2, dtype=torch.float64)]
    _oracle_lamb.lamb_step(groups, max_grad_norm=None)
    torch.testing.assert_close(groups[0]["params"][0], b.detach(), atol=1e-15, rtol=0)
    assert groups[0]["step"] == 2


# ---------------------------------------------------------------- the oracles' loss-scaling contract

def _fresh(kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4,), (0,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params[2].zero_()
    options = dict(weight_decay=0.01, momentum=0.9, dampening=0.3) if kind == "lars" else dict(caution=True)
    return [dict(options, lr=0.1, params=params, grads=None, state=[{} for _ in shapes])]


def _grads(seed, scale=1.0):
    gen = torch.Generator().manual_seed(100 + seed)
    shapes = [(5, 3), (3,), (4,), (0,)]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes]
    grads[1] = None if seed % 2 else grads[1]
    return grads


def _step(kind, groups, **kw):
    (_oracle_lars.lars_step if kind == "lars" else _oracle_lamb.lamb_step)(groups, **kw)


def _snapshot(groups):
    return copy.deepcopy([{k: v for k, v in g.items() if k != "grads"} for g in groups])


def _assert_identical(a, b, where="groups"):
    """Equal structure, equal values, tensors bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_oracle_divides_by_grad_scale(kind):
    plain, scaled = _fresh(kind), _fresh(kind)
    s = 2.0 ** 12  # a power of two: the division is exact, so the results are identical
    for step in range(6):
        plain[0]["grads"] = _grads(step)
        scaled[0]["grads"] = [None if g is None else g * s for g in _grads(step)]
        _step(kind, plain)
        _step(kind, scaled, grad_scale=torch.tensor(s))
    for p, q in zip(plain[0]["params"], scaled[0]["params"]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
@pytest.mark.parametrize("skip_at", [0, 3])
def test_oracle_step_with_found_inf_changes_nothing(kind, skip_at):
    # Skipped at the first step: no state appears, so the next applied step is still the first
    # (LARS's buffer starts as that step's adapted gradient, LAMB's count at 1).
    skipped, replay = _fresh(kind), _fresh(kind)
    for step in range(6):
        if step == skip_at:
            before = _snapshot(skipped)
            skipped[0]["grads"] = [None if g is None else torch.full_like(g, float("inf")) for g in _grads(step)]
            _step(kind, skipped, found_inf=torch.tensor(1.0), grad_scale=torch.tensor(3.0))
            _assert_identical(_snapshot(skipped), before)
            continue
        skipped[0]["grads"] = _grads(step)
        _step(kind, skipped, found_inf=torch.tensor(0.0))
        replay[0]["grads"] = _grads(step)  # the same run without the skipped step's gradients
        _step(kind, replay)
    _assert_identical(_snapshot(skipped), _snapshot(replay))
    if kind == "lamb":
        assert skipped[0]["step"] == 5
