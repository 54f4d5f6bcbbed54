"""The CUDA-graph guards' logic on CPU: with capture simulated, a Python lr and state creation are
refused before anything changes; without it, nothing is refused; and every part of the package
asks the same question (``engine.capture.capturing``), the triton backend's table cache included.
test_cuda_graphs.py runs the real captures on a GPU."""
import pytest
import torch

from fromage_fused.engine import capture
from _training_setup import LR, assert_same, loss_of, make, snapshot


def simulate_capture(monkeypatch):
    monkeypatch.setattr(capture, "capturing", lambda device: True)


def stepped(lr, steps=1, backend="foreach"):
    model, opt = make(backend=backend, lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
    loss_of(model, steps).backward()
    return model, opt


def test_nothing_is_refused_outside_capture():
    assert not capture.capturing(torch.device("cpu"))
    model, opt = make(lr=LR)  # a Python lr, and state to create at the first step
    loss_of(model, 0).backward()
    before = snapshot(model, opt)
    opt.step()
    assert "sr_seed" in opt.state[model.low] and float(opt.state[model.lin.weight]["max_norm"]) > 0
    after = snapshot(model, opt)
    assert all(not torch.equal(before[0][n], after[0][n]) for n in before[0])


def test_triton_tables_made_under_capture_are_held(monkeypatch):
    from _interpreter_kernels import triton_on_cpu

    triton_on_cpu()
    model, opt = stepped(torch.tensor(LR), backend="triton")
    backend = opt._device_backends[torch.device("cpu")]
    made_eagerly = set(backend._tables)
    assert not any(t.held for t in backend._tables.values())
    simulate_capture(monkeypatch)
    opt.zero_grad(set_to_none=True)  # new gradient storage: new address tables, made "inside capture"
    loss_of(model, 1).backward()
    opt.step()
    made_captured = [t for key, t in backend._tables.items() if key not in made_eagerly]
    assert made_captured and all(t.held for t in made_captured)


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
