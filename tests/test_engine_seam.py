"""The engine's seam with a rule that is not Fromage: what the next rules (LARS, LAMB) need from it.

A small rule written only against the engine (no kernel code: it steps on the Python backends)
uses everything Fromage does not: a tuple-valued per-step hyper-parameter, an elementwise buffer
kept in float32 for bf16 parameters, a per-group step count on the device, three passes of which
the first reduces a sum that is combined across every group of the step (a global gradient norm,
as LAMB's ``max_grad_norm``), and a per-tensor sum in the middle pass. Its float64 oracle is a
plain loop; the engine must give the oracle's result, skip everything on ``found_inf``, raise
before any change, keep the buffer's dtype through ``state_dict``, and count steps per group.
"""
import copy
import math

import pytest
import torch

from fromage_fused.engine.optimizer import EngineOptimizer
from fromage_fused.engine.rule import Buffer, GroupScalar, Pass, Rule
from fromage_fused.engine.spec import Spec, check_lr, check_positive_or_none, flag, option, value


def _check_betas(name, betas, read_tensor=True):
    if not (isinstance(betas, tuple) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"invalid betas: {betas!r}")


def _norms(tensors, acc):
    return torch.stack([t.to(acc).square().sum() for t in tensors]) if tensors else torch.zeros(0, dtype=acc)


class _Math:
    """Pass 0: sum ||g||^2 (combined into a global clip factor); pass 1: buf <- b1 buf + c g, sum
    ||buf||^2; pass 2: p <- p - lr buf / (1 - b2^t) / max(1, ||buf||) (t the group's step count)."""

    @staticmethod
    def run_pass(index, call):
        acc = call.hyper.dtype
        if call.found_inf is not None and float(call.found_inf) != 0 and index > 0:
            return None
        if index == 0:
            (grads,) = call.lists
            scale = 1.0 if call.grad_scale is None else call.grad_scale.to(acc)
            return (_norms(grads, acc) / (scale * scale)).reshape(-1, 1)
        lr, b1, b2 = call.hyper[0], call.hyper[1], call.hyper[2]
        if index == 1:
            bufs, grads = call.lists
            scale = 1.0 if call.grad_scale is None else call.grad_scale.to(acc)
            for b, g in zip(bufs, grads):
                b.copy_(b1 * b + call.globals * g.to(acc) / scale)
            return _norms(bufs, acc).reshape(-1, 1)
        params, bufs = call.lists
        t = call.counters["step"].to(acc) + 1
        for i, (p, b) in enumerate(zip(params, bufs)):
            damp = torch.clamp(call.sums[i, 0].sqrt(), min=1.0)
            p.copy_((p.to(acc) - lr * b / (1 - b2 ** t) / damp).to(p.dtype))
        return None


class ToyRule(Rule):
    name = "toy"
    title = "Toy"
    spec = Spec(value("lr", 0.1, check_lr, tensor=True), value("betas", (0.5, 0.9), _check_betas, width=2),
                option("max_grad_norm", 1.0, check_positive_or_none), flag("unused", False))
    # the step count in the param group, as timm's LAMB keeps it
    state = (Buffer("momentum"), GroupScalar("step", torch.float32, anchor=lambda p: True, when=lambda v, d: True,
                                             initial=lambda opt, index, device: 0, where="group"))
    passes = (Pass("grad_norm", lists=("g",), sums=1, combine=True),
              Pass("momentum", lists=("momentum", "g"), writes=1, sums=1),
              Pass("update", lists=("p", "momentum"), writes=1))
    reference = _Math()
    foreach = _Math()

    def combine(self, index, sums, groups):
        total = torch.stack([s.sum().to(torch.float64).cpu() for s in sums]).sum()
        clip = torch.clamp(total.sqrt() / groups[0].values["max_grad_norm"], min=1.0)
        return (1.0 / clip).to(sums[0].dtype)


TOY = ToyRule()


class Toy(EngineOptimizer):
    rule = TOY

    def __init__(self, params, lr=0.1, betas=(0.5, 0.9), max_grad_norm=1.0, *, unused=False, backend="auto"):
        super().__init__(params, dict(lr=lr, betas=betas, max_grad_norm=max_grad_norm, unused=unused), backend=backend)


def _oracle(params, grads_per_step, groups, skipped=()):
    """float64: params[k] list of tensors per param group; groups: their (lr, betas, max_grad_norm)."""
    params = [[p.double().clone() for p in ps] for ps in params]
    bufs = [[torch.zeros_like(p) for p in ps] for ps in params]
    steps = [0] * len(params)
    for s, grads in enumerate(grads_per_step):
        if s in skipped:
            continue
        total = sum(float(g.double().square().sum()) for gs in grads for g in gs)
        c = 1.0 / max(math.sqrt(total) / groups[0][2], 1.0)
        for k, (lr, (b1, b2), _) in enumerate(groups):
            steps[k] += 1
            for i, g in enumerate(grads[k]):
                bufs[k][i] = b1 * bufs[k][i] + c * g.double()
                damp = max(float(bufs[k][i].norm()), 1.0)
                params[k][i] = params[k][i] - lr * bufs[k][i] / (1 - b2 ** steps[k]) / damp
    return params, bufs, steps


def _setup(dtype=torch.float64, backend="reference"):
    gen = torch.Generator().manual_seed(3)
    shapes = [[(4, 3), (5,)], [(2, 2, 2), (1,)]]
    params = [[torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in ss]
              for ss in shapes]
    opt = Toy([{"params": params[0]}, {"params": params[1], "lr": 0.05, "betas": (0.8, 0.99)}], backend=backend)
    groups = [(0.1, (0.5, 0.9), 1.0), (0.05, (0.8, 0.99), 1.0)]
    return params, opt, groups


def _grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for ps in params:
        gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        for p, g in zip(ps, gs):
            p.grad = (g * scale).to(p.dtype)
        out.append(gs)
    return out


@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_a_rule_with_buffers_counters_and_a_global_pass_matches_its_oracle(backend):
    params, opt, groups = _setup(backend=backend)
    start = [[p.detach().clone() for p in ps] for ps in params]
    history = []
    for step in range(6):
        history.append(_grads(params, step))
        opt.step()
    want, bufs, steps = _oracle(start, history, groups)
    for ps, ws, bs in zip(params, want, bufs):
        for p, w, b in zip(ps, ws, bs):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["momentum"], b, rtol=1e-12, atol=1e-12)
    # one step count per param group, in the group, advanced once per step
    assert [float(g["step"]) for g in opt.param_groups] == steps == [6, 6]
    assert all("step" not in opt.state[p] for ps in params for p in ps)


def test_found_inf_skips_every_pass_and_the_count_and_grad_scale_divides():
    params, opt, groups = _setup()
    start = [[p.detach().clone() for p in ps] for ps in params]
    history = []
    for step in range(5):
        history.append(_grads(params, step, scale=64.0))
        opt.grad_scale = torch.tensor(64.0)
        opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)
        opt.step()
    want, _, steps = _oracle(start, history, groups, skipped={2})
    for ps, ws in zip(params, want):
        for p, w in zip(ps, ws):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)
    assert [float(g["step"]) for g in opt.param_groups] == steps == [4, 4]


def test_bf16_parameters_keep_float32_buffers_through_a_checkpoint():
    params, opt, _ = _setup(torch.bfloat16, backend="foreach")
    _grads(params, 0)
    opt.step()
    buf = opt.state[params[0][0]]["momentum"]
    assert buf.dtype == torch.float32
    twin_params = copy.deepcopy(params)
    twin = Toy([{"params": twin_params[0]}, {"params": twin_params[1], "lr": 0.05, "betas": (0.8, 0.99)}],
               backend="foreach")
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    loaded = twin.state[twin_params[0][0]]["momentum"]
    assert loaded.dtype == torch.float32 and torch.equal(loaded, buf)
    assert twin.param_groups[0]["step"].dtype == torch.float32 and float(twin.param_groups[0]["step"]) == 1


def test_bad_values_raise_before_anything_changes():
    params, opt, _ = _setup()
    _grads(params, 0)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for ps in params for p in ps]
    opt.param_groups[1]["betas"] = (0.5, 1.5)
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, [p for ps in params for p in ps]))
    after = opt.state_dict()
    assert all(torch.equal(after["state"][k][n], state["state"][k][n])
               for k in state["state"] for n in state["state"][k])
    with pytest.raises(ValueError, match="unused must be True or False"):
        Toy([torch.nn.Parameter(torch.zeros(2))], unused="no")


def test_a_per_step_value_changes_without_a_new_plan_and_a_structural_one_rebuilds():
    params, opt, _ = _setup()
    _grads(params, 0)
    opt.step()
    plan = opt._plan
    opt.param_groups[0]["betas"] = (0.1, 0.2)
    opt.param_groups[0]["lr"] = torch.tensor(0.3)
    _grads(params, 1)
    opt.step()
    assert opt._plan is plan
    opt.param_groups[0]["max_grad_norm"] = 2.0
    _grads(params, 2)
    opt.step()
    assert opt._plan is not plan


def test_a_group_kept_count_advances_without_gradients_and_takes_another_implementations_number():
    params, opt, _ = _setup()
    _grads(params, 0)
    for p in params[1]:
        p.grad = None
    opt.step()
    opt.step()
    assert [float(g["step"]) for g in opt.param_groups] == [2, 2]
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][1]["step"] = 7  # a count saved as a Python int (timm <= 1.0.27)
    opt.load_state_dict(sd)
    opt.step()
    assert torch.is_tensor(opt.param_groups[1]["step"]) and float(opt.param_groups[1]["step"]) == 8


def test_a_combining_pass_global_values_reach_every_later_pass(monkeypatch):
    # The update pass (2) reads the global values of pass 0, although pass 1 reduced sums of its own.
    seen = {}
    original = _Math.run_pass

    def spy(index, call):
        seen[index] = call.globals
        return original(index, call)

    monkeypatch.setattr(_Math, "run_pass", staticmethod(spy))
    params, opt, _ = _setup()
    _grads(params, 0)
    opt.step()
    assert seen[0] is None and torch.is_tensor(seen[1]) and seen[2] is seen[1]


class _TogetherRule(ToyRule):
    """The toy rule whose max_grad_norm is one value for all param groups (as LAMB's)."""

    name = "toy_together"

    def check_groups(self, groups):
        if len({g["max_grad_norm"] for g in groups}) > 1:
            raise ValueError("max_grad_norm differs between the param groups")


class _Together(Toy):
    rule = _TogetherRule()


def test_a_rules_check_of_its_groups_together_runs_before_any_state_exists_and_on_load():
    params, _, _ = _setup()
    opt = _Together([{"params": params[0]}, {"params": params[1], "max_grad_norm": 2.0}], backend="reference")
    before = [p.detach().clone() for ps in params for p in ps]
    _grads(params, 0)
    with pytest.raises(ValueError, match="differs"):
        opt.step()
    assert not any(opt.state[p] for ps in params for p in ps)  # no buffer was created
    assert all("step" not in g for g in opt.param_groups)
    assert all(torch.equal(a, p) for a, p in zip(before, [p for ps in params for p in ps]))
    opt.param_groups[1]["max_grad_norm"] = 1.0
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["max_grad_norm"] = 3.0
    with pytest.raises(ValueError, match="differs"):
        opt.load_state_dict(state)
    assert [g["max_grad_norm"] for g in opt.param_groups] == [1.0, 1.0]
