"""LARS and LAMB on a GPU: a captured step replays like eager steps (a scheduler changing the
device lr between replays), and an eager step with GradScaler's tensors never synchronises. GPU
only; the same step logic runs on the CPU in test_lars_rule.py, test_lamb_rule.py and
test_compile.py."""
import pytest
import torch
from torch import nn

from fromage_fused import LARS
from fromage_fused.rules.lamb import LAMB
from _host_reads import forbid_cuda_sync

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
#: per optimizer: its class, its starting lr and options (LAMB's clipping and caution: every pass)
OPTIMIZERS = {
    "lars": (LARS, 0.5, dict(momentum=0.9, weight_decay=1e-2, trust_coeff=0.02, nesterov=True)),
    "lamb": (LAMB, 0.01, dict(weight_decay=0.1, caution=True, max_grad_norm=0.05)),
}
WARMUP, STEPS = 3, 10
#: replayed vs eager: the same kernels on the same values, so equal up to fp32 reduction order.
GRAPH_TOL = (1e-6, 1e-5)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(DEVICE)
    nn.init.zeros_(model[2].bias)
    return model


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=gen).to(DEVICE), torch.randn(8, 4, generator=gen).to(DEVICE)


def _optimizer(kind, model, backend):
    cls, lr, options = OPTIMIZERS[kind]
    opt = cls(model.parameters(), lr=torch.tensor(lr, device=DEVICE), backend=backend, **options)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)



def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.backends(devices=("cuda",), reference=False, interpreted=False)
def test_replay_matches_eager(kind, backend):
    model = _model()
    opt, sched = _optimizer(kind, model, backend)
    for step in range(WARMUP + STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(model, *_batch(step)).backward()
        opt.step()
        if step >= WARMUP:
            sched.step()
    eager = [p.detach().clone() for p in model.parameters()]

    model = _model()
    opt, sched = _optimizer(kind, model, backend)
    static_x, static_y = (t.clone() for t in _batch(0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):
            x, y = _batch(step)
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            _loss(model, static_x, static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        _loss(model, static_x, static_y).backward()
        opt.step()
    for step in range(WARMUP, WARMUP + STEPS):
        x, y = _batch(step)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        sched.step()
    torch.cuda.synchronize()
    assert {g.backend.name for g in opt._plan.groups} == {backend}
    atol, rtol = GRAPH_TOL
    for p, q in zip(model.parameters(), eager):
        torch.testing.assert_close(p.detach(), q, atol=atol, rtol=rtol)


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.backends(devices=("cuda",), reference=False, interpreted=False)
def test_eager_step_does_not_sync(kind, backend):
    model = _model()
    opt, _ = _optimizer(kind, model, backend)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        _loss(model, *_batch(step)).backward()
        opt.grad_scale = torch.tensor(1024.0, device=DEVICE)  # as GradScaler sets them
        opt.found_inf = torch.zeros((), device=DEVICE)
        if step == 0:
            opt.step()  # creates the state (a first step may allocate)
            continue
        with forbid_cuda_sync():
            opt.step()
    assert {g.backend.name for g in opt._plan.groups} == {backend}
    assert all(opt.state[p] for p in model.parameters())
