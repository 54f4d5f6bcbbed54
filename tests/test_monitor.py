"""Per-layer monitoring: what last_stats() reports equals float64 computations from the tensors
before and after the step, on every backend; it reads nothing on the host; off, it costs nothing."""
import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused.rules.fromage.flags import INNER
from fromage_fused import Fromage
from _host_reads import forbid_host_reads



def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    shapes = [(6, 5), (7,), (3, 2, 2), (4,)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    with torch.no_grad():
        params[3].zero_()  # a zero tensor: it moves (fallback) from norm 0
    return params


def _grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype)


@pytest.mark.parametrize("p_bound", [None, 1.01])
@pytest.mark.parametrize("maximize", [False, True])
def test_last_stats_match_float64(backend, p_bound, maximize):
    params = _params()
    opt = Fromage(params, lr=0.1, p_bound=p_bound, maximize=maximize, backend=backend, monitor=True)
    for step in range(3):
        _grads(params, step)
        before = [p.detach().double().clone() for p in params]
        grads = [p.grad.double() for p in params]
        if backend == "reference":  # the one backend that reads on the host
            opt.step()
            with forbid_host_reads():
                (stats,) = opt.last_stats()
        else:
            with forbid_host_reads():
                opt.step()
                (stats,) = opt.last_stats()
        assert stats.params == params
        after = [p.detach().double() for p in params]
        p_norm = torch.stack([b.norm() for b in before])
        g_norm = torch.stack([g.norm() for g in grads])
        moved = torch.stack([(a - b).norm() for a, b in zip(after, before)])
        torch.testing.assert_close(stats.p_norm.double(), p_norm, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats.g_norm.double(), g_norm, rtol=1e-6, atol=0)
        cos = torch.stack([(b * g).sum() / (b.norm() * g.norm()) for b, g in zip(before, grads)])
        live = p_norm > 0
        torch.testing.assert_close(stats.cos.double()[live], cos[live], rtol=0, atol=1e-5)
        torch.testing.assert_close(stats.relative_change.double()[live], (moved / p_norm)[live], rtol=1e-4, atol=1e-6)
        if step == 0:  # the zero tensor: no cosine; it moves from norm 0, unless p_bound holds it there
            assert not live[3] and torch.isnan(stats.cos[3])
            assert torch.isinf(stats.relative_change[3]) if p_bound is None else stats.relative_change[3] == 0
        if p_bound is None:
            assert not stats.clamped.any()
        else:
            norms_after = torch.stack([a.norm() for a in after])
            bound = torch.stack([opt.state[p]["max_norm"].double() for p in params])
            at_bound = (norms_after - bound).abs() <= 1e-5 * bound
            # zero max_norm (the zero tensor under p_bound): held at zero, every step a clamp
            assert torch.equal(stats.clamped[live], at_bound[live])
    assert p_bound is None or stats.clamped.any()  # the bound was reached: some tensor was clamped


def test_loss_scaling_and_skipped_steps(backend):
    params = _params()
    opt = Fromage(params, lr=0.05, p_bound=2.0, backend=backend, monitor=True)
    _grads(params, 0, scale=1024.0)
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    opt.step()
    (stats,) = opt.last_stats()
    want = torch.stack([p.grad.double().norm() / 1024 for p in params])
    torch.testing.assert_close(stats.g_norm.double(), want, rtol=1e-6, atol=0)
    assert (stats.relative_change[:3] > 0).all()
    opt.found_inf = torch.tensor(1.0)
    before = [p.detach().clone() for p in params]
    opt.step()
    (stats,) = opt.last_stats()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert not stats.relative_change.any() and not stats.clamped.any()


def test_off_keeps_nothing_and_computes_no_inner_products(monkeypatch):
    params = _params()
    opt = Fromage(params, lr=0.05, backend="foreach")
    calls = []
    backend = fromage_fused.backends.get("foreach")
    real = type(backend).run_pass

    def run_pass(self, rule, index, call):
        if index == 0:
            calls.append(bool(call.flags & INNER))
        return real(self, rule, index, call)

    monkeypatch.setattr(type(backend), "run_pass", run_pass)
    _grads(params, 0)
    opt.step()
    assert opt.last_stats() == [] and opt._last_records is None and calls == [False]
    opt.monitor = True
    opt.step()
    assert calls == [False, True] and len(opt.last_stats()) == 1


def test_groups_and_dtypes_give_one_entry_each():
    a, b = _params(), _params(torch.bfloat16)
    opt = Fromage([{"params": a}, {"params": b, "lr": 0.2}], monitor=True)
    _grads(a, 1)
    _grads(b, 2)
    opt.step()
    stats = opt.last_stats()
    assert [s.params for s in stats] == [a, b]
    per = stats[1].per_parameter()
    assert list(per) == b and set(per[b[0]]) == {"p_norm", "g_norm", "cos", "relative_change", "clamped"}
    torch.testing.assert_close(per[b[0]]["relative_change"].double(), torch.tensor(0.2, dtype=torch.float64), rtol=0.05,
                               atol=0)


def test_monitor_must_be_a_bool():
    with pytest.raises(ValueError, match="monitor must be True or False"):
        Fromage([nn.Parameter(torch.randn(2))], monitor="yes")
