"""CUDA graphs: a captured training step replays like eager steps (lr changed in place by a
scheduler included); what a capture cannot hold is refused with a clear error. GPU only; the
same step logic runs on CPU in test_compile.py and test_amp.py."""
import pytest
import torch

from fromage_fused import functional
from _host_reads import forbid_cuda_sync
from _training_setup import LR, assert_same, batch, loss_from, loss_of, make, snapshot, training_backends

pytestmark = pytest.mark.gpu

#: replayed vs eager after WARMUP + STEPS steps; bf16 allows a stochastic rounding that went the
#: other way after a one-ulp fp32 difference.
GRAPH_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (0.0, 2 ** -6)}
WARMUP, STEPS = 3, 12
DEVICE = "cuda"


def capture_backends():
    return training_backends(DEVICE, reference=False)


def device_lr():
    return torch.tensor(LR, device=DEVICE)


def eager_run(backend):
    model, opt = make(DEVICE, backend, lr=device_lr())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    for step in range(WARMUP + STEPS):
        opt.zero_grad(set_to_none=True)
        loss_from(model, *batch(step, DEVICE)).backward()
        opt.step()
        if step >= WARMUP:
            sched.step()
    torch.cuda.synchronize()
    return snapshot(model, opt), opt


def warm_up(model, opt, static_x, static_y):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(WARMUP):
            x, y = batch(step, DEVICE)
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            loss_from(model, static_x, static_y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)


def flood_table_cache(backend):
    """Steps enough new tensor groups to evict every table cache entry that no graph holds; their
    allocations reuse any device memory a wrongly evicted table had."""
    for i in range(80):
        ps = [torch.randn(3 + i, device=DEVICE), torch.randn(70_000, device=DEVICE)]
        functional.fromage(ps, [torch.randn_like(p) for p in ps], None, lr=0.01, backend=backend)


@pytest.mark.parametrize("pressure", [False, True], ids=["plain", "cache-pressure"])
@pytest.mark.parametrize("backend", capture_backends())
def test_replay_matches_eager(backend, pressure):
    # zero_grad(set_to_none=True) before the capture: the gradients are allocated inside it, so the
    # tensor tables miss there and are uploaded (from pinned buffers) inside the graph.
    eager, eager_opt = eager_run(backend)

    model, opt = make(DEVICE, backend, lr=device_lr())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    static_x, static_y = (t.clone() for t in batch(0, DEVICE))
    warm_up(model, opt, static_x, static_y)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss_from(model, static_x, static_y).backward()
        opt.step()
    if pressure:
        flood_table_cache(backend)
    for step in range(WARMUP, WARMUP + STEPS):
        x, y = batch(step, DEVICE)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        sched.step()
    torch.cuda.synchronize()
    assert opt.param_groups[0]["lr"].item() == eager_opt.param_groups[0]["lr"].item() < LR
    assert_same(eager, snapshot(model, opt), exact=False, tol=GRAPH_TOL)


@pytest.mark.parametrize("lr", [LR, torch.tensor(LR)], ids=["python-float", "cpu-tensor"])
def test_capture_refuses_an_lr_it_cannot_follow(lr):
    model, opt = make(DEVICE, "foreach", lr=lr)
    static_x, static_y = (t.clone() for t in batch(0, DEVICE))
    warm_up(model, opt, static_x, static_y)
    before = snapshot(model, opt)
    graph = torch.cuda.CUDAGraph()
    marker = torch.zeros((), device=DEVICE)
    with pytest.raises(RuntimeError, match="captured Fromage step needs lr"):
        with torch.cuda.graph(graph):
            marker.add_(1)
            opt.step()
    torch.cuda.synchronize()
    assert_same(before, snapshot(model, opt))


def test_capture_refuses_to_create_state():
    model, opt = make(DEVICE, "foreach", lr=device_lr())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    graph = torch.cuda.CUDAGraph()
    marker = torch.zeros((), device=DEVICE)
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        with torch.cuda.graph(graph):
            marker.add_(1)
            opt.step()
    assert not any(opt.state.values())


@pytest.mark.parametrize("backend", capture_backends())
def test_eager_step_does_not_sync(backend):
    model, opt = make(DEVICE, backend, lr=device_lr())
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        loss_of(model, step, DEVICE).backward()
        opt.grad_scale = torch.tensor(1024.0, device=DEVICE)  # as GradScaler sets them
        opt.found_inf = torch.zeros((), device=DEVICE)
        with forbid_cuda_sync():
            opt.step()
    assert opt.state[model.lin.weight]["max_norm"].item() > 0


@pytest.mark.parametrize("backend", capture_backends())
def test_repeated_captures_on_new_storage_are_bounded(backend, monkeypatch):
    # Each capture on new gradient storage holds a new tensor table for as long as its graph may
    # replay: past the bound a capture refuses, saying what to do; released, captures go on.
    import fromage_fused
    from fromage_fused.backends import triton as triton_backend

    if backend not in ("cuda", "triton"):
        pytest.skip("only the cuda and triton backends keep tensor tables")
    monkeypatch.setattr(triton_backend, "GRAPH_TABLE_LIMIT", 8)
    limit = 256 if backend == "cuda" else 8
    fromage_fused.release_graph_tables()
    params = [torch.randn(5, device=DEVICE), torch.randn(70_000, device=DEVICE)]
    lr = device_lr()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        functional.fromage(params, [torch.randn_like(p) for p in params], None, lr=lr, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    kept, graphs = [], []

    def capture():
        grads = [torch.randn_like(p) for p in params]  # new storage: new tables, made inside the capture
        kept.append(grads)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            functional.fromage(params, grads, None, lr=lr, backend=backend)
        graphs.append(graph)

    with pytest.raises(RuntimeError, match=r"tensor tables for captured CUDA graphs, its limit.*release_graph_tables"):
        for _ in range(limit + 1):
            capture()
    assert limit - 2 <= len(graphs) <= limit
    graphs[-1].replay()  # the graphs made before the refusal still replay
    torch.cuda.synchronize()
    graphs.clear()
    assert fromage_fused.release_graph_tables() >= limit - 1
    capture()
    graphs[-1].replay()
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
