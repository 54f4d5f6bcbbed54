"""Fromage under torch.amp.GradScaler: no unscale pass, skipped steps change nothing, and the
zero-norm fallback sees the unscaled gradient. CPU in CI, CUDA when present."""
import math

import pytest
import torch

from _training_setup import LR, assert_same, loss_of, make, one_thread, snapshot
from _host_reads import forbid_host_reads

SCALE = 2.0 ** 16
#: scaled vs unscaled runs, dtype -> (atol, rtol): a power-of-two scale is exact, so only a
#: reordered reduction could differ; bf16 allows one stochastic rounding to the other neighbour.
SCALED_TOL = {torch.float32: (1e-7, 1e-6), torch.bfloat16: (0.0, 2 ** -7)}



@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def scaler(device):
    return torch.amp.GradScaler(device, init_scale=SCALE, growth_interval=1000)


def plain_step(model, opt, step, device, clip=None):
    opt.zero_grad(set_to_none=True)
    loss_of(model, step, device).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def scaled_step(model, opt, sc, step, device, clip=None, poison=None):
    opt.zero_grad(set_to_none=True)
    sc.scale(loss_of(model, step, device)).backward()
    if poison is not None:
        model.lin.weight.grad[1, 2] = poison
    if clip is not None:
        sc.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    sc.step(opt)
    sc.update()


@pytest.mark.backends(interpreted=False)
@pytest.mark.parametrize("clip", [None, 0.5], ids=["scaled", "unscale_+clip"])
def test_scaled_steps_equal_unscaled(device, backend, clip):
    m0, o0 = make(device, backend)
    m1, o1 = make(device, backend)
    sc = scaler(device)
    for step in range(4):
        plain_step(m0, o0, step, device, clip)
        scaled_step(m1, o1, sc, step, device, clip)
        assert sc.get_scale() == SCALE
        assert not hasattr(o1, "grad_scale") and not hasattr(o1, "found_inf")
        assert_same(snapshot(m0, o0), snapshot(m1, o1), exact=False, tol=SCALED_TOL)


@pytest.mark.backends(interpreted=False)
@pytest.mark.parametrize("clip", [None, 0.5], ids=["scaled", "unscale_+clip"])
def test_fallback_uses_unscaled_gradient(device, backend, clip):
    model, opt = make(device, backend)
    opt.zero_grad()
    loss_of(model, 0, device).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    g = model.lin.bias.grad.clone()
    assert model.lin.bias.abs().max() == 0 and g.abs().max() > 0
    scaled_step(model, opt, scaler(device), 0, device, clip)
    if clip is None:  # no unscale pass ran: the gradients still carry the scale
        torch.testing.assert_close(model.lin.bias.grad, g * SCALE, atol=0, rtol=1e-6)
    want = -LR * g / math.sqrt(1 + LR * LR)
    torch.testing.assert_close(model.lin.bias.detach(), want, atol=1e-7, rtol=1e-6)


@pytest.mark.backends(interpreted=False)
@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("clip", [None, 0.5], ids=["scaled", "unscale_+clip"])
def test_nonfinite_step_changes_nothing_and_lowers_scale(device, backend, poison, clip):
    model, opt = make(device, backend, seed=5)
    sc = scaler(device)
    before = snapshot(model, opt)
    scaled_step(model, opt, sc, 0, device, clip, poison=poison)
    assert sc.get_scale() == SCALE / 2
    after = snapshot(model, opt)
    assert_same((before[0], {}), (after[0], {}))
    # A skipped first step may create state, holding its start values only: max_norm unset.
    assert after[1]["lin.weight"]["max_norm"].item() < 0
    # Skipped then good equals good alone, bit for bit, state (seed, max_norm) included.
    scaled_step(model, opt, sc, 1, device, clip)
    ref_model, ref_opt = make(device, backend, seed=5)
    scaled_step(ref_model, ref_opt, scaler(device), 1, device, clip)
    assert_same(snapshot(ref_model, ref_opt), snapshot(model, opt))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_failed_step_leaves_no_stale_scaler_attributes(device):
    m0, o0 = make(device)
    m1, o1 = make(device)
    sc = scaler(device)
    scaled_step(m0, o0, scaler(device), 0, device)

    o1.zero_grad()
    sc.scale(loss_of(m1, 0, device)).backward()
    good = m1.lin.weight.grad
    m1.lin.weight.grad = good.to_sparse()
    before = snapshot(m1, o1)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        sc.step(o1)
    assert not hasattr(o1, "grad_scale") and not hasattr(o1, "found_inf")
    assert_same((before[0], {}), (snapshot(m1, o1)[0], {}))
    # Retrying the same scaler step must not multiply in the old scale.
    m1.lin.weight.grad = good
    sc.step(o1)
    sc.update()
    assert_same(snapshot(m0, o0), snapshot(m1, o1))


def test_step_reads_no_host_value():
    model, opt = make("cpu", "foreach")
    loss_of(model, 0).backward()
    opt.grad_scale = torch.tensor(SCALE)
    opt.found_inf = torch.tensor(0.0)
    with forbid_host_reads():
        opt.step()
    assert opt.state[model.lin.weight]["max_norm"].item() > 0
