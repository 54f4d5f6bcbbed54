"""The CUDA-graph guards' logic on CPU: with capture simulated, a Python lr and state creation are
refused before anything changes; without it, nothing is refused. test_cuda_graphs.py runs the
real captures on a GPU."""
import pytest
import torch

from fromage_fused import _training
from _training_setup import LR, assert_same, loss_of, make, snapshot


def simulate_capture(monkeypatch):
    monkeypatch.setattr(_training, "capturing", lambda device: True)


def stepped(lr, steps=1):
    model, opt = make(lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    loss_of(model, steps).backward()
    return model, opt


def test_nothing_is_refused_outside_capture():
    assert not _training.capturing(torch.device("cpu"))
    stepped(LR)[1].step()


def test_python_lr_is_refused_under_capture(monkeypatch):
    model, opt = stepped(LR)
    simulate_capture(monkeypatch)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="needs lr as a tensor"):
        opt.step()
    assert_same(before, snapshot(model, opt))


def test_state_creation_is_refused_under_capture(monkeypatch):
    model, opt = make(lr=torch.tensor(LR))
    loss_of(model, 0).backward()
    simulate_capture(monkeypatch)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        opt.step()
    assert_same(before, snapshot(model, opt))
    # only the unset max_norm of p_bound groups exists (made at construction, outside capture)
    assert all(set(st) <= {"max_norm"} and float(st["max_norm"]) < 0 for st in opt.state.values() if st)


def test_warm_optimizer_steps_under_capture(monkeypatch):
    model, opt = stepped(torch.tensor(LR))
    simulate_capture(monkeypatch)
    seed = opt.state[model.low]["sr_seed"].clone()
    opt.step()
    assert opt.state[model.low]["sr_seed"].item() == seed.item() + 1
