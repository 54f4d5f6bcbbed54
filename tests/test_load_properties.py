"""load_state_dict against hostile input (hypothesis): a state_dict edited at random, each edit known
to be valid or not. The property is exact both ways: the load raises exactly when something invalid
was drawn; a load that raises has changed nothing (state_dict, parameters, and the steps after it);
a load that succeeds steps exactly as a fresh optimizer given the same hyper-parameters and state."""
import copy
import math
import os
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fromage_fused
from fromage_fused import Fromage

SETTINGS = settings(max_examples=int(os.environ.get("FROMAGE_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
                    derandomize=bool(os.environ.get("CI")),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BACKENDS = [b for b in ("foreach", "cpu") if b in fromage_fused.available_backends("cpu")]
KEEP, DROP = "keep", "drop"
DEFAULTS = dict(lr=0.02, p_bound=None, maximize=False, prefactor=True, stochastic_rounding=False)

#: (value, valid) of each edit; KEEP leaves the entry as saved, DROP deletes it.
LRS = [(KEEP, True), (DROP, True), (0.05, True), (torch.tensor(0.03), True), (Fraction(1, 20), True), (0, True),
       (math.nan, False), (-1.0, False), (math.inf, False), ("0.1", False), (True, False), (10 ** 400, False),
       (torch.tensor([0.1, 0.2]), False), (torch.tensor(math.nan), False), (torch.tensor(1), False)]
P_BOUNDS = [(KEEP, True), (DROP, True), (None, True), (2.0, True), (Fraction(3, 2), True), (0, False), (-1.0, False),
            (math.nan, False), ("1", False), (True, False)]
FLAGS = [(KEEP, True), (DROP, True), (True, True), (False, True), ("False", False), (1, False), (None, False)]
MAX_NORMS = [(KEEP, True), (DROP, True), (3.0, True), (torch.tensor(2.5), True), (-1.0, True), (0.0, True),
             (torch.tensor([4.0], dtype=torch.float64), True), (7, True), (math.nan, False), (math.inf, False),
             (-0.5, False), (1e39, False), (torch.tensor([1.0, 2.0]), False), ("1", False), (True, False),
             (None, False), (torch.tensor(1.0 + 1j), False)]
SEEDS = [(KEEP, True), (DROP, True), (5, True), (torch.tensor(7), True), (-3, True), (2 ** 70, False), (1.5, False),
         (torch.tensor(1.5), False), ("3", False)]
ENTRIES = [(KEEP, True), ("not_a_dict", False), ("extra_key", True)]
STRUCTURE = [(KEEP, True), ("group_dropped", False), ("param_dropped", False)]


def _model():
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5).to(torch.bfloat16)),
            nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(6).to(torch.bfloat16))]


def _optimizer(params, backend, groups):
    return Fromage([{"params": params[:2], **groups[0]}, {"params": params[2:], **groups[1]}],
                   backend=backend, seed=5, **DEFAULTS)


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _train(params, opt, steps, seed):
    for i in range(steps):
        _grads(params, seed * 100 + i)
        opt.step()


def _snapshot(params, opt):
    sd = opt.state_dict()
    groups = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
    state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in e.items()} for k, e in sd["state"].items()}
    return groups, state, [p.detach().clone() for p in params]


def _same_value(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _same(x, y):
    (ga, sa, pa), (gb, sb, pb) = x, y
    return (len(ga) == len(gb)
            and all(a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a) for a, b in zip(ga, gb))
            and sa.keys() == sb.keys()
            and all(sa[k].keys() == sb[k].keys() and all(_same_value(sa[k][n], sb[k][n]) for n in sa[k]) for k in sa)
            and all(torch.equal(a, b) for a, b in zip(pa, pb)))


def _edit(entry, key, choice):
    value, _ = choice
    if value is KEEP:
        return
    if value is DROP:
        entry.pop(key, None)
    else:
        entry[key] = value


group_edits = st.fixed_dictionaries({"lr": st.sampled_from(LRS), "p_bound": st.sampled_from(P_BOUNDS),
                                     "maximize": st.sampled_from(FLAGS), "stochastic_rounding": st.sampled_from(FLAGS)})
state_edits = st.fixed_dictionaries({"max_norm": st.sampled_from(MAX_NORMS), "sr_seed": st.sampled_from(SEEDS),
                                     "entry": st.sampled_from(ENTRIES)})


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(source=st.lists(st.fixed_dictionaries({"p_bound": st.sampled_from([None, 1.5]),
                                              "stochastic_rounding": st.booleans()}),
                       min_size=2, max_size=2),
       groups=st.lists(group_edits, min_size=2, max_size=2),
       states=st.lists(state_edits, min_size=4, max_size=4),
       structure=st.sampled_from(STRUCTURE))
def test_a_load_raises_and_changes_nothing_or_equals_a_fresh_optimizer(backend, source, groups, states, structure):
    # the checkpoint: a run with its own hyper-parameters, stepped once
    params = _model()
    saver = _optimizer(params, backend, source)
    _train(params, saver, 1, seed=1)
    sd = copy.deepcopy(saver.state_dict())
    valid = structure[1]
    for saved, edits in zip(sd["param_groups"], groups):
        for key, choice in edits.items():
            _edit(saved, key, choice)
            valid &= choice[1]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    for pid, edits in zip(ids, states):
        entry = sd["state"].setdefault(pid, {})
        for key in ("max_norm", "sr_seed"):
            _edit(entry, key, edits[key])
            valid &= edits[key][1]
        if edits["entry"][0] == "not_a_dict":
            sd["state"][pid] = 0.5
            valid = False
        elif edits["entry"][0] == "extra_key":
            entry["momentum"] = torch.zeros(2)
    if structure[0] == "group_dropped":
        sd["param_groups"].pop()
    elif structure[0] == "param_dropped":
        sd["param_groups"][0]["params"].pop()

    # the optimizer it is loaded into: other hyper-parameters, stepped twice
    params = _model()
    opt = _optimizer(params, backend, [{"lr": 0.5, "p_bound": 3.0}, {"maximize": True}])
    _train(params, opt, 2, seed=2)
    twin_params, twin_opt = copy.deepcopy((params, opt))
    before = _snapshot(params, opt)
    try:
        opt.load_state_dict(copy.deepcopy(sd))
        raised = False
    except ValueError:
        raised = True
    assert raised == (not valid)
    if raised:
        assert _same(_snapshot(params, opt), before)
        want_params, want_opt = twin_params, twin_opt
    else:
        # a fresh optimizer given the same values: the loaded hyper-parameters (a missing one takes
        # the constructor's), the loaded state set by hand
        want_params = [p.detach().clone().requires_grad_() for p in params]
        loaded = [{k: g.get(k, DEFAULTS[k]) for k in DEFAULTS} for g in sd["param_groups"]]
        want_opt = _optimizer(want_params, backend, loaded)
        for pid, p in zip(ids, want_params):
            for key, dtype in (("max_norm", torch.float32), ("sr_seed", torch.int64)):
                value = sd["state"].get(pid, {}).get(key)
                if value is not None:
                    value = value.reshape(()).item() if torch.is_tensor(value) else value
                    want_opt.state[p][key] = torch.tensor(value, dtype=dtype)
    _train(params, opt, 2, seed=3)
    _train(want_params, want_opt, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(params, want_params))
    got, want = _snapshot(params, opt), _snapshot(want_params, want_opt)
    for k in set(got[1]) | set(want[1]):  # (an empty state entry counts as none)
        for name in ("max_norm", "sr_seed"):
            assert _same_value(got[1].get(k, {}).get(name), want[1].get(k, {}).get(name)), (k, name)
