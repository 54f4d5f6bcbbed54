"""A step that raises changes nothing (hypothesis): mixes of valid and invalid parameters, gradients,
param groups and hyper-parameters, of Fromage, LARS and LAMB, on every backend that runs on CPU
(Triton under its interpreter included). Every drawn input is known to be valid or not, so the
property is exact both ways: the step raises exactly when something invalid was drawn, and then no
parameter, no state and no param group has changed."""
import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fromage_fused import LAMB, LARS, Fromage, functional
from fromage_fused.functional import UNSET_MAX_NORM

SETTINGS = settings(max_examples=int(os.environ.get("FROMAGE_HYPOTHESIS_EXAMPLES", 25)), deadline=None,
                    derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TRITON = "triton"
ERRORS = (RuntimeError, ValueError, TypeError)
FLOAT8 = getattr(torch, "float8_e4m3fn", None)

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.complex64, torch.float16]
SHAPES = [(), (3,), (2, 3), (0,)]

#: (name, valid) for each kind of gradient a parameter gets at the checked step.
GRADS = {"normal": True, "none": True, "zeros": True, "strided": True, "negated": True,
         "other_dtype": False, "other_shape": False, "sparse": False, "float8_param": False}
#: edits of a group after its first step: (value, valid); "keep" leaves it.
LRS = [("keep", True), (0.05, True), ("tensor", True), (-1.0, False), (math.nan, False), ("0.1", False),
       ("two_elements", False), ("int_tensor", False)]
P_BOUNDS = [("keep", True), (None, True), (2.0, True), (0, False), (-1.0, False), (math.nan, False), (True, False)]
FLAGS = [("keep", True), (True, True), (False, True), ("False", False), (1, False)]


param_specs = st.tuples(st.sampled_from(DTYPES), st.sampled_from(SHAPES), st.sampled_from(list(GRADS)))
group_specs = st.fixed_dictionaries({
    "params": st.lists(param_specs, min_size=1, max_size=3),
    "p_bound": st.sampled_from([None, 1.0]),
    "maximize": st.booleans(),
    "rounding": st.booleans(),
    "lr_edit": st.sampled_from(range(len(LRS))),
    "p_bound_edit": st.sampled_from(range(len(P_BOUNDS))),
    "flag_edit": st.tuples(st.sampled_from(["maximize", "prefactor", "stochastic_rounding"]),
                           st.sampled_from(range(len(FLAGS)))),
})


def _values(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (torch.complex(x, x * 0.5) if dtype.is_complex else x).to(dtype)


def _grad(p, kind, seed):
    """The gradient of kind ``kind`` for ``p``; None for "none"."""
    if kind == "none":
        return None
    if kind == "zeros":
        return torch.zeros_like(p)
    g = _values(p.shape, p.dtype, seed)
    if kind == "strided":
        return torch.stack([g, g]).select(0, 1) if g.dim() == 0 else g.unsqueeze(-1).expand(*g.shape, 2)[..., 0]
    if kind == "negated":
        return torch._neg_view(-g) if not g.is_complex() else g.conj().conj()
    if kind == "sparse":
        return g.to_sparse() if g.dim() else g.reshape(1).to_sparse()
    return g


def _set_grad(p, kind, seed):
    g = _grad(p, kind, seed)
    if kind == "other_dtype":
        p.grad = g
        other = torch.float64 if p.dtype != torch.float64 else torch.float32
        p.grad.data = g.to(other if not p.is_complex() else torch.complex128)
    elif kind == "other_shape":
        p.grad = g
        p.grad.data = _values((5, 1), p.dtype, seed)
    elif kind == "float8_param":
        p.data = p.data.real.float().to(FLOAT8) if p.is_complex() else p.data.float().to(FLOAT8)
        p.grad = None
        p.grad = torch.zeros(p.shape).to(FLOAT8)
    elif kind == "sparse":
        p.grad = g if g.shape == p.shape else None
        if p.grad is None:  # a 0-d parameter: its sparse gradient needs a 1-d view of it
            p.data = p.data.reshape(1)
            p.grad = g
    else:
        p.grad = g


def _lr(value):
    tensors = {"tensor": lambda: torch.tensor(0.05), "two_elements": lambda: torch.tensor([0.05, 0.1]),
               "int_tensor": lambda: torch.tensor(1)}
    return tensors[value]() if isinstance(value, str) and value in tensors else value


def _snapshot(opt):
    groups = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    params = [(p.dtype, p.shape, p.detach().clone()) for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return groups, params, state


def _same_value(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _assert_unchanged(opt, snap):
    groups, params, state = snap
    now_groups, now_params, now_state = _snapshot(opt)
    assert len(groups) == len(now_groups)
    for a, b in zip(groups, now_groups):
        assert a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    for (d0, s0, v0), (d1, s1, v1) in zip(params, now_params):
        assert d0 == d1 and s0 == s1 and torch.equal(v0.view(torch.uint8) if v0.dtype == FLOAT8 else v0,
                                                     v1.view(torch.uint8) if v1.dtype == FLOAT8 else v1)
    assert state.keys() == now_state.keys()
    for k in state:
        assert (state[k].keys() == now_state[k].keys()
                and all(torch.equal(state[k][n], now_state[k][n]) for n in state[k]))


@SETTINGS
@given(specs=st.lists(group_specs, min_size=1, max_size=3), seed=st.integers(0, 2 ** 16))
def test_a_step_that_raises_changes_nothing(backend, specs, seed):
    if backend == TRITON:
        specs = specs[:2]
    groups, kinds = [], []
    for spec in specs:
        params = [torch.nn.Parameter(_values(shape, dtype,
                                             seed + i)) for i, (dtype, shape, _) in enumerate(spec["params"])]
        groups.append({"params": params, "p_bound": spec["p_bound"], "maximize": spec["maximize"],
                       "stochastic_rounding": spec["rounding"]})
        kinds.append([kind for _, _, kind in spec["params"]])
    opt = Fromage(groups, lr=0.01, backend=backend, seed=1)
    for group in opt.param_groups:  # a first, valid step: the plan and the state exist
        for p in group["params"]:
            p.grad = _values(p.shape, p.dtype, seed + 7)
    opt.step()
    # the step ran through the backend under test (float64 goes to foreach in the kernel backends)
    assert {g.backend.name for g in opt._plan.groups} <= {backend, "foreach"}
    assert (any(g.backend.name == backend for g in opt._plan.groups)
            or all(g.dtype == torch.float64 for g in opt._plan.groups))
    valid = True
    for group, spec, group_kinds in zip(opt.param_groups, specs, kinds):
        lr, ok = LRS[spec["lr_edit"]]
        valid &= ok
        if lr != "keep":
            group["lr"] = _lr(lr)
        p_bound, ok = P_BOUNDS[spec["p_bound_edit"]]
        valid &= ok
        if p_bound != "keep":
            group["p_bound"] = p_bound
        flag, (value, ok) = spec["flag_edit"][0], FLAGS[spec["flag_edit"][1]]
        valid &= ok
        if value != "keep":
            group[flag] = value
        for i, (p, kind) in enumerate(zip(group["params"], group_kinds)):
            _set_grad(p, kind, seed + 11 * i)
            valid &= GRADS[kind]
    snap = _snapshot(opt)
    try:
        opt.step()
    except ERRORS:
        assert not valid, "a valid step raised"
        _assert_unchanged(opt, snap)
    else:
        assert valid, "an invalid step was accepted"


#: per rule: its class, the options of its valid first step, and edits of group 0 after it:
#: (name, value, valid); None for max_grad_norm's validity: valid only where group 0 is the only group
#: (LAMB clips all groups together, so they must agree).
OTHER_RULES = {
    "lars": (LARS, dict(momentum=0.9, weight_decay=1e-2, trust_clip=True), [
        ("keep", None, True), ("momentum", 0.5, True), ("momentum", 0.0, True), ("momentum", -0.1, False),
        ("weight_decay", math.nan, False), ("weight_decay", 0.0, True), ("trust_coeff", 0.01, True),
        ("eps", math.inf, False), ("dampening", math.nan, False), ("always_adapt", "yes", False),
        ("trust_clip", False, True)]),
    "lamb": (LAMB, dict(weight_decay=1e-2, caution=True, max_grad_norm=1.0), [
        ("keep", None, True), ("betas", (0.8, 0.99), True), ("betas", (0.9, 1.0), False), ("eps", -1.0, False),
        ("weight_decay", 0.0, True), ("weight_decay", math.inf, False), ("max_grad_norm", 2.0, None),
        ("max_grad_norm", 0.0, False), ("caution", False, True), ("decoupled_decay", "no", False)]),
}


@SETTINGS
@given(rule=st.sampled_from(sorted(OTHER_RULES)), params=st.lists(param_specs, min_size=1, max_size=4),
       two_groups=st.booleans(), lr_edit=st.sampled_from(range(len(LRS))), edit=st.integers(0, 9),
       seed=st.integers(0, 2 ** 16))
def test_a_lars_or_lamb_step_that_raises_changes_nothing(backend, rule, params, two_groups, lr_edit, edit, seed):
    cls, options, edits = OTHER_RULES[rule]
    if backend == TRITON:
        params = params[:2]
    tensors = [torch.nn.Parameter(_values(shape, dtype, seed + i)) for i, (dtype, shape, _) in enumerate(params)]
    cut = 1 if two_groups and len(tensors) > 1 else len(tensors)
    groups = [{"params": tensors[:cut]}] + ([{"params": tensors[cut:]}] if cut < len(tensors) else [])
    opt = cls(groups, lr=0.01, backend=backend, **options)
    for p in tensors:  # a first, valid step: the plan and the state exist
        p.grad = _values(p.shape, p.dtype, seed + 7)
    opt.step()
    assert {g.backend.name for g in opt._plan.groups} <= {backend, "foreach"}
    lr, valid = LRS[lr_edit]
    if lr != "keep":
        opt.param_groups[0]["lr"] = _lr(lr)
    name, value, ok = edits[edit % len(edits)]
    if name != "keep":
        opt.param_groups[0][name] = value
    valid &= (len(opt.param_groups) == 1) if ok is None else ok
    for i, (p, (_, _, kind)) in enumerate(zip(tensors, params)):
        _set_grad(p, kind, seed + 11 * i)
        valid &= GRADS[kind]
    snap = _snapshot(opt)
    try:
        opt.step()
    except ERRORS:
        assert not valid, "a valid step raised"
        _assert_unchanged(opt, snap)
    else:
        assert valid, "an invalid step was accepted"


max_norm_kinds = st.sampled_from(["ok", "float64", "shaped", "missing"])


@SETTINGS
@given(params=st.lists(param_specs, min_size=1, max_size=4), p_bound=st.sampled_from(P_BOUNDS[1:]),
       lr=st.sampled_from(LRS[1:]), maximize=st.sampled_from([(False, True), (True, True), ("yes", False)]),
       max_norms=max_norm_kinds, seed=st.integers(0, 2 ** 16))
def test_a_functional_step_that_raises_changes_nothing(backend, params, p_bound, lr, maximize, max_norms, seed):
    tensors, grads, valid = [], [], True
    for i, (dtype, shape, kind) in enumerate(params):
        p = torch.nn.Parameter(_values(shape, dtype, seed + i))
        _set_grad(p, kind, seed + 11 * i)
        valid &= GRADS[kind]
        if p.grad is None:  # the functional form takes a gradient for every tensor
            p.grad = torch.zeros_like(p)
        tensors.append(p.detach())
        grads.append(p.grad)
    (p_bound, ok_bound), (lr, ok_lr), (maximize, ok_max) = p_bound, lr, maximize
    valid &= ok_bound and ok_lr and ok_max
    mn = None
    if max_norms != "missing":
        mn = [torch.full((), UNSET_MAX_NORM) for _ in tensors]
        if max_norms == "float64":
            mn[-1] = mn[-1].double()
        elif max_norms == "shaped":
            mn[0] = mn[0].reshape(1)
    # max_norm tensors are read (and must be right) only with a p_bound, which needs them
    valid &= p_bound is None or max_norms == "ok"
    before = [t.clone() for t in tensors]
    mn_before = None if mn is None else [m.clone() for m in mn]
    try:
        functional.fromage(tensors, grads, mn, lr=_lr(lr), p_bound=p_bound, maximize=maximize, backend=backend)
    except ERRORS:
        assert not valid, "a valid step raised"
        assert all(torch.equal(a.view(torch.uint8) if a.dtype == FLOAT8 else a,
                               b.view(torch.uint8) if b.dtype == FLOAT8 else b)
                   for a, b in zip(before, tensors))
        assert mn is None or all(torch.equal(a, b) for a, b in zip(mn_before, mn))
    else:
        assert valid, "an invalid step was accepted"
