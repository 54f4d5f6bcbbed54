"""The persistent step plan: reused while it fits, built again whenever anything it depends on changed.

Each case steps an optimizer once (the plan is built), changes something, and steps again; a twin
(a deep copy taken before the change, which has no plan and so builds one from scratch) gets the
same change and steps too. Both must end the same: equal parameters and state, or the same error
with nothing changed. Every case also runs with the plan forcibly reused (its revalidation patched
to say "fits"), and must then come out different: proof that the case detects a wrongly reused plan.
"""
import copy

import pytest
import torch
from torch import nn

import _triton_interpreter  # noqa: F401  (triton among the backends on a machine without CUDA)
import fromage_fused
from fromage_fused import Fromage
from fromage_fused.engine import plan as _step_plan, plan_record as _grad_check
from fromage_fused.functional import UNSET_MAX_NORM

BACKENDS = [b for b in fromage_fused.available_backends("cpu")]
CHECKERS = ["native", "python"]


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _fill(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = (g if not p.is_complex() else torch.complex(g, g.flip(-1) if g.dim() else g)).to(p.dtype)


def _model(backend, **kw):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(7)),
              nn.Parameter(torch.randn(3, dtype=torch.complex64)), nn.Parameter(torch.randn(6).to(torch.bfloat16)),
              nn.Parameter(torch.randn(4, 4))]
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 0.05}]
    opt = Fromage(groups, lr=0.02, backend=backend, seed=3, **kw)
    return params, opt


def _outcome(params, opt):
    try:
        opt.step()
        error = None
    except (RuntimeError, ValueError) as exc:
        error = type(exc)
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state}
    return error, [p.detach().clone() for p in params], state


def _same(a, b):
    (ea, pa, sa), (eb, pb, sb) = a, b
    return (ea is eb and len(pa) == len(pb)
            and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(pa, pb))
            and sa.keys() == sb.keys()
            and all(sa[k].keys() == sb[k].keys() and all(torch.equal(sa[k][n], sb[k][n]) for n in sa[k]) for k in sa))


def _twin(params, opt):
    """A deep copy of (params, opt), gradients included (a Parameter's deepcopy leaves them out)."""
    twin_params, twin_opt = copy.deepcopy((params, opt))
    for p, q in zip(params, twin_params):
        q.grad = None if p.grad is None else p.grad.clone()
        storage = p.untyped_storage()
        if storage.nbytes() != q.untyped_storage().nbytes():  # a view with room: deepcopy copies the view only
            whole = torch.empty(0, dtype=p.dtype).set_(storage, 0, (storage.nbytes() // p.element_size(),), (1,))
            q.data = whole.clone().as_strided(p.shape, p.stride(), p.storage_offset())
    assert twin_opt._plan is None
    return twin_params, twin_opt


def _run(backend, checker, change, monkeypatch, *, force_reuse=False, model=_model, **kw):
    if checker == "python":
        monkeypatch.setattr(_grad_check, "native_available", lambda params: False)
    params, opt = model(backend, **kw)
    _fill(params, 1)
    opt.step()
    assert opt._plan is not None
    _fill(params, 2)
    twin_params, twin_opt = _twin(params, opt)
    with pytest.MonkeyPatch.context() as forced:
        if force_reuse:  # the plan survives whatever happens: no revalidation, no invalidation
            forced.setattr(_step_plan.StepPlan, "refresh", lambda self, o: True)
            forced.setattr(Fromage, "_invalidate_plan", lambda self: None)
        change(params, opt)
        got = _outcome(params, opt)
    change(twin_params, twin_opt)
    want = _outcome(twin_params, twin_opt)
    return got, want


def _grad_none(params, opt):
    params[1].grad = None


def _grad_other_shape(params, opt):
    # torch refuses to assign a gradient of another shape or dtype, but not to change its .data
    params[0].grad.data = _randn(4, 5)


def _grad_other_dtype(params, opt):
    params[1].grad.data = params[1].grad.data.double()


def _grad_sparse(params, opt):
    # (a gradient on another device: torch refuses it on assignment and through .data, so only an
    # accelerator could show it; the plan checks devices as it checks dtypes)
    params[1].grad = params[1].grad.to_sparse()


def _grad_negated(params, opt):
    # a lazily negated view: kernels that read raw storage would see the values un-negated
    params[4].grad = torch._neg_view(-params[4].grad)


def _grad_conjugated(params, opt):
    params[2].grad = params[2].grad.conj().conj().conj()  # a lazy conjugate of the conjugate


def _grad_strided(params, opt):
    g = params[4].grad
    params[4].grad = g.t().contiguous().t()  # same values, column-major


def _param_new_storage_complex(params, opt):
    params[2].data = params[2].data.clone()  # the plan's real view of the old storage is stale


def _param_to_float64(params, opt):
    for p in params[:2]:
        p.data = p.data.double()
        p.grad = p.grad.double()


def _param_transposed(params, opt):
    params[4].data = params[4].data.t()  # same storage and shape, no longer contiguous


def _param_shrunk(params, opt):
    # the same storage, fewer rows: a backend that memoised the element count would read past the
    # gradient (given room here, so that the forced reuse below reads garbage, not beyond memory).
    # (Parameter 4: its group steps no views, so the backends get the plan's own lists.)
    params[4].data = params[4].data[:2]
    params[4].grad = _randn(4, 4, seed=3)[:2]


def _param_grown(params, opt):
    # a view grown over the storage it has room in: a memoised element count leaves the tail out
    params[4].data = params[4].data.as_strided((8, 4), (4, 1))
    params[4].grad = _randn(8, 4, seed=3)


def _model_with_room(backend, **kw):
    params, opt = _model(backend, **kw)
    params[4].data = _randn(8, 4, seed=5)[:4]  # (before any plan exists)
    return params, opt


def _param_reassigned(params, opt):
    opt.param_groups[0]["params"][1] = nn.Parameter(_randn(7))
    opt.param_groups[0]["params"][1].grad = _randn(7, seed=1)


def _param_appended(params, opt):
    extra = nn.Parameter(_randn(3))
    extra.grad = _randn(3, seed=1)
    opt.param_groups[0]["params"].append(extra)
    params.append(extra)


def _param_removed(params, opt):
    opt.param_groups[1]["params"].pop()
    params.pop()


def _lr_edited(params, opt):
    opt.param_groups[0]["lr"] = 0.3


def _p_bound_on(params, opt):
    opt.param_groups[1]["p_bound"] = 0.5


def _maximize_on(params, opt):
    opt.param_groups[0]["maximize"] = True


def _prefactor_off(params, opt):
    opt.param_groups[1]["prefactor"] = False


def _rounding_on(params, opt):
    opt.param_groups[1]["stochastic_rounding"] = True


def _bad_lr(params, opt):
    opt.param_groups[1]["lr"] = -1.0


def _state_loaded(params, opt):
    sd = copy.deepcopy(opt.state_dict())
    for entry in sd["state"].values():
        if "max_norm" in entry:
            entry["max_norm"] = entry["max_norm"] * 0.5
    opt.load_state_dict(sd)


def _state_entry_replaced(params, opt):
    opt.state[params[0]]["max_norm"] = torch.tensor(1.0)


def _group_added(params, opt):
    extra = nn.Parameter(_randn(4))
    extra.grad = _randn(4, seed=1)
    opt.add_param_group({"params": [extra], "lr": 0.1})
    params.append(extra)


CASES = {
    "grad_none": (_grad_none, {}),
    "grad_other_shape": (_grad_other_shape, {}),
    "grad_other_dtype": (_grad_other_dtype, {}),
    "grad_sparse": (_grad_sparse, {}),
    "grad_strided": (_grad_strided, {}),
    "grad_negated": (_grad_negated, {}),
    "grad_conjugated": (_grad_conjugated, {}),
    "param_new_storage": (_param_new_storage_complex, {}),
    "param_to_float64": (_param_to_float64, {}),
    "param_transposed": (_param_transposed, {}),
    "param_shrunk": (_param_shrunk, {}),
    "param_grown": (_param_grown, {"model": _model_with_room}),
    "param_reassigned": (_param_reassigned, {}),
    "param_appended": (_param_appended, {}),
    "param_removed": (_param_removed, {}),
    "lr_edited": (_lr_edited, {}),
    "p_bound_on": (_p_bound_on, {}),
    "maximize_on": (_maximize_on, {}),
    "prefactor_off": (_prefactor_off, {}),
    "rounding_on": (_rounding_on, {}),
    "bad_lr": (_bad_lr, {}),
    "state_loaded": (_state_loaded, {"p_bound": 1.5}),
    "state_entry_replaced": (_state_entry_replaced, {"p_bound": 1.5}),
    "group_added": (_group_added, {}),
}


@pytest.mark.parametrize("checker", CHECKERS)
@pytest.mark.parametrize("case", list(CASES))
def test_a_changed_plan_steps_as_a_fresh_one(case, backend, checker, monkeypatch):
    change, kw = CASES[case]
    got, want = _run(backend, checker, change, monkeypatch, **kw)
    assert _same(got, want), (got[0], want[0])


@pytest.mark.parametrize("checker", CHECKERS)
def test_the_checker_asked_for_is_the_one_used(checker, monkeypatch):
    if checker == "native" and not _grad_check.native_available([]):
        pytest.skip("the extension is not loaded here")
    if checker == "python":
        monkeypatch.setattr(_grad_check, "native_available", lambda params: False)
    params, opt = _model("foreach")
    _fill(params, 0)
    opt.step()
    assert all((part.record.native is not None) == (checker == "native") for part in opt._plan.parts)


#: Cases a wrongly reused plan gets right on foreach (which holds each parameter itself), but not on
#: a backend that memoises what it derived from the plan's tensors.
MEMO_CASES = {"param_shrunk": "triton", "param_grown": "triton"}


@pytest.mark.parametrize("case", list(CASES))
def test_each_case_catches_a_wrongly_reused_plan(case, monkeypatch):
    change, kw = CASES[case]
    backend = MEMO_CASES.get(case, "foreach")
    if backend not in BACKENDS:
        pytest.skip(f"{backend} does not run here")
    got, want = _run(backend, "python", change, monkeypatch, force_reuse=True, **kw)
    assert not _same(got, want)


@pytest.mark.parametrize("checker", CHECKERS)
def test_a_gradient_that_appears_rebuilds(backend, checker, monkeypatch):
    # no gradient at the first step, one at the second: the plan had left the parameter out
    if checker == "python":
        monkeypatch.setattr(_grad_check, "native_available", lambda params: False)
    params, opt = _model(backend)
    _fill(params, 1)
    params[1].grad = None
    opt.step()
    _fill(params, 2)
    before = params[1].detach().clone()
    opt.step()
    assert not torch.equal(before, params[1].detach())


@pytest.mark.parametrize("checker", CHECKERS)
def test_new_gradients_every_step_reuse_the_plan(backend, checker, monkeypatch):
    # the training loop's case (zero_grad sets them to None, backward makes new ones): no rebuild
    if checker == "python":
        monkeypatch.setattr(_grad_check, "native_available", lambda params: False)
    params, opt = _model(backend, p_bound=2.0)
    twin_params, twin_opt = _twin(params, opt)
    builds = []
    real_build = _step_plan.build
    monkeypatch.setattr(_step_plan, "build", lambda o, **kw: builds.append(o) or real_build(o, **kw))
    for step in range(4):
        for ps, o in ((params, opt), (twin_params, twin_opt)):
            o.zero_grad()
            _fill(ps, step)
            o._invalidate_plan() if o is twin_opt else None
            o.step()
    assert builds.count(opt) == 1 and builds.count(twin_opt) == 4
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    if checker == "native" and fromage_fused.backends.native._state["loaded"]:
        assert all(part.record.native is not None for part in opt._plan.parts)


def test_the_native_checker_is_used_when_the_extension_is_loaded():
    pytest.importorskip("fromage_fused.backends.native")
    if "cpu" not in fromage_fused.available_backends("cpu"):
        pytest.skip("the extension is not built here")
    params, opt = _model("cpu")
    _fill(params, 0)
    opt.step()
    assert all(part.record.native is not None for part in opt._plan.parts)


def test_a_step_that_raises_keeps_no_plan_and_changes_no_state(monkeypatch):
    params, opt = _model("foreach", p_bound=1.0)
    _fill(params, 0)
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert opt._plan is None
    assert all(float(opt.state[p]["max_norm"]) == UNSET_MAX_NORM for p in params)


def test_backends_never_get_an_empty_group(monkeypatch):
    # a param group whose parameters have no gradients makes no group at all (backends/_base.py)
    calls = []
    backend = fromage_fused.backends.get("foreach")
    real = type(backend).run_pass
    monkeypatch.setattr(type(backend), "run_pass",
                        lambda self, rule, index, call: (calls.append(len(call.lists[0]))
                                                         or real(self, rule, index, call)))
    params, opt = _model("foreach")
    _fill(params, 0)
    for p in opt.param_groups[1]["params"]:
        p.grad = None
    opt.step()
    opt.step()
    assert calls and 0 not in calls


def _model_strided(backend, **kw):
    params, opt = _model(backend, **kw)
    params[4].data = _randn(64, seed=5).as_strided((4, 4), (8, 1))  # (before any plan exists)
    return params, opt


def _new_address(p):
    return torch.empty_strided(p.shape, p.stride()).copy_(p)


#: For each fact of backends._base.PLAN_KEY that can change alone on a CPU, a change of it alone.
#: (dtype and device cannot: a cast or a move gives another address; param_to_float64 covers them.)
FACTS = {
    "data_ptr": lambda p: _new_address(p),
    "shape": lambda p: p.as_strided((3, 4), (8, 1)),
    "stride": lambda p: p.as_strided((4, 4), (8, 2)),
}


def _fact_change(fact):
    def change(params, opt):
        p = params[4]
        before = {"data_ptr": p.data_ptr(), "shape": p.shape, "stride": p.stride(), "dtype": p.dtype,
                  "device": p.device}
        p.data = FACTS[fact](p.data)
        after = {"data_ptr": p.data_ptr(), "shape": p.shape, "stride": p.stride(), "dtype": p.dtype, "device": p.device}
        assert {k for k in before if before[k] != after[k]} == {fact}
        p.grad = _randn(*p.shape, seed=7)
    return change


def test_every_fact_of_the_plan_key_is_tested():
    from fromage_fused.backends import _base

    assert set(FACTS) | {"dtype", "device"} == set(_base.PLAN_KEY)


@pytest.mark.parametrize("checker", CHECKERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fact", list(FACTS))
def test_each_fact_a_backend_may_memoise_rebuilds_the_plan_alone(fact, backend, checker, monkeypatch):
    builds = []
    real_build = _step_plan.build
    monkeypatch.setattr(_step_plan, "build", lambda o, **kw: builds.append(o) or real_build(o, **kw))
    got, want = _run(backend, checker, _fact_change(fact), monkeypatch, model=_model_strided)
    assert got[0] is None and _same(got, want)
    assert len(builds) == 3  # the first step, the step after the change, and the twin's fresh one
