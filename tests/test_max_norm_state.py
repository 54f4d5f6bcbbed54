"""The p_bound state: one max_norm tensor per group of tensors stepped together.

A bounded group hands its backend one ``[n]`` float32 tensor, and the parameters' ``max_norm``
state entries are 0-d views of it, so that what checkpoints see and what the kernels write are the
same memory. Where the state is not laid out so (a loaded checkpoint, some parameters without
gradients, mixed dtypes), the plan lays it out anew with the same values; during graph capture it
steps a stacked copy and writes it back instead. Either way the step is the same, bit for bit.
"""
import copy

import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage
from fromage_fused.engine import capture
from fromage_fused.functional import UNSET_MAX_NORM



def _params(dtypes=(torch.float32,) * 4):
    gen = torch.Generator().manual_seed(0)
    sizes = [(5, 4), (7,), (3, 3), (11,)]
    return [nn.Parameter(torch.randn(sizes[i % 4], generator=gen).to(d)) for i, d in enumerate(dtypes)]


def _grads(params, seed, skip=()):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i in skip else (torch.randn(p.shape, generator=gen) * 3).to(p.dtype)


def _spy(monkeypatch, backend_name):
    """Record the max_norm argument of every apply pass of the backend (alone, or run with the stats
    pass: ``run_pair``)."""
    backend = fromage_fused.backends.get(backend_name)
    seen = []
    original, original_pair = type(backend).run_pass, type(backend).run_pair

    def run_pass(self, rule, index, call):
        if index == 1:
            seen.append(call.scalars.get("max_norm"))
        return original(self, rule, index, call)

    def run_pair(self, rule, index, call):
        if index == 0:
            seen.append(call.scalars.get("max_norm"))
        return original_pair(self, rule, index, call)

    monkeypatch.setattr(type(backend), "run_pass", run_pass)
    monkeypatch.setattr(type(backend), "run_pair", run_pair)
    return seen


def _entries_of(buffer, states):
    return all(s.data_ptr() == buffer.data_ptr() + i * 4 for i, s in enumerate(states))


def test_backend_gets_one_tensor_whose_entries_are_the_state(backend, monkeypatch):
    params = _params()
    opt = Fromage(params, lr=0.5, p_bound=1.0, backend=backend)
    seen = _spy(monkeypatch, backend)
    _grads(params, 1)
    opt.step()
    (buffer,) = seen
    assert buffer.shape == (4,) and buffer.dtype == torch.float32 and buffer.is_contiguous()
    states = [opt.state[p]["max_norm"] for p in params]
    assert all(s.dim() == 0 for s in states) and _entries_of(buffer, states)
    assert (buffer > 0).all()  # set by the first step, through the views


def test_state_stays_the_same_tensors_and_in_place_edits_count(backend):
    params = _params()
    opt = Fromage(params, lr=0.5, p_bound=1.0, backend=backend)
    _grads(params, 1)
    opt.step()
    held = [opt.state[p]["max_norm"] for p in params]
    opt.zero_grad(set_to_none=True)
    _grads(params, 2)  # new gradient tensors: a new plan, laid out as before
    opt.step()
    assert all(opt.state[p]["max_norm"] is h for p, h in zip(params, held))
    # A tighter bound written into a state tensor in place binds the next step.
    held[0].fill_(0.25)
    _grads(params, 3)
    opt.step()
    assert float(params[0].detach().float().norm()) == pytest.approx(0.25, rel=1e-5)


def _run(backend, dtypes, schedule, captured, monkeypatch, load=False):
    params = _params(dtypes)
    # Tensor lrs: a captured step needs them (the simulated capture refuses Python numbers, as a real one).
    opt = Fromage([{"params": params[:3]}, {"params": params[3:], "lr": torch.tensor(0.2)}], lr=torch.tensor(0.3),
                  p_bound=1.2, backend=backend)
    with monkeypatch.context() as m:
        if captured:  # the plan steps as it does during graph capture: a stacked copy, written back
            m.setattr(capture, "capturing", lambda device: True)
        for step, skip in enumerate(schedule):
            _grads(params, 10 + step, skip)
            if load and step == 2:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            opt.step()
    return params, {i: float(opt.state[p]["max_norm"]) for i, p in enumerate(params)}


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 4,
                                    (torch.float32, torch.bfloat16, torch.float32, torch.float16)],
                         ids=["fp32", "mixed"])
@pytest.mark.parametrize("load", [False, True], ids=["", "loaded"])
def test_laid_out_state_and_stacked_copy_step_alike(backend, dtypes, load, monkeypatch):
    # Parameters without gradients in some steps make groups whose state is not consecutive.
    schedule = [(), (1,), (), (0, 2), ()]
    p1, s1 = _run(backend, dtypes, schedule, False, monkeypatch, load)
    p2, s2 = _run(backend, dtypes, schedule, True, monkeypatch, load)
    assert s1 == s2 and all(v > 0 for v in s1.values())
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


def test_during_capture_state_is_used_as_it_is(backend, monkeypatch):
    params = _params((torch.float32, torch.bfloat16, torch.float32, torch.float32))
    opt = Fromage(params, lr=torch.tensor(0.5), p_bound=1.0, backend=backend)
    seen = _spy(monkeypatch, backend)
    held = [opt.state[p]["max_norm"] for p in params]
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    _grads(params, 1, skip=(2,))
    opt.step()
    # Neither group's state is consecutive: stacked copies, and the state tensors stay.
    assert all(opt.state[p]["max_norm"] is h for p, h in zip(params, held))
    assert not any(_entries_of(b, [held[0], held[3]]) for b in seen)
    assert all(float(held[i]) > 0 for i in (0, 1, 3)) and float(held[2]) == UNSET_MAX_NORM
    # Laid out by an eager build, the state is then used in place during capture too.
    monkeypatch.setattr(capture, "capturing", lambda device: False)
    _grads(params, 2)
    opt.step()
    monkeypatch.setattr(capture, "capturing", lambda device: True)
    seen.clear()
    opt.zero_grad(set_to_none=True)
    _grads(params, 3)
    opt.step()
    fp32 = [opt.state[p]["max_norm"] for p in (params[0], params[2], params[3])]
    assert any(b.shape == (3,) and _entries_of(b, fp32) for b in seen)


def test_a_laid_out_state_survives_state_dict_round_trips(tmp_path):
    params = _params()
    opt = Fromage(params, lr=0.5, p_bound=1.0, backend="foreach")
    _grads(params, 1)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    values = [float(loaded["state"][i]["max_norm"]) for i in range(4)]
    assert values == [float(opt.state[p]["max_norm"]) for p in params]
    assert all(loaded["state"][i]["max_norm"].shape == () for i in range(4))
    twin = Fromage(_params(), lr=0.5, p_bound=1.0, backend="foreach")
    twin.load_state_dict(loaded)
    assert [float(twin.state[p]["max_norm"]) for p in twin.param_groups[0]["params"]] == values


def test_new_state_is_unset_views_of_one_tensor_per_device():
    params = _params()
    opt = Fromage(params, lr=0.5, p_bound=1.0)
    states = [opt.state[p]["max_norm"] for p in params]
    assert all(float(s) == UNSET_MAX_NORM for s in states)
    assert _entries_of(states[0].as_strided((4,), (1,)), states)
