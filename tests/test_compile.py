"""torch.compile: the optimizer step traces as one graph, and a compiled training step gives the
eager result. Small models, few compiles: compilation dominates the cost on CPU."""
import pytest
import torch

from fromage_fused import Fromage
from _interpreter_kernels import triton_on_cpu

from _training_setup import LR, assert_same, batch, loss_from, loss_of, make, one_thread, snapshot

#: compiled vs eager after STEPS steps; bf16 allows a stochastic rounding that went the other way
#: after a one-ulp fp32 difference (a reordered reduction).
COMPILE_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (0.0, 2 ** -6)}
STEPS = 12
#: fail on a second compile (torch >= 2.7 names these recompile_limit, 2.6 cache_size_limit)
ONE_COMPILE = (dict(recompile_limit=1, fail_on_recompile_limit_hit=True)
               if hasattr(torch._dynamo.config, "recompile_limit")
               else dict(cache_size_limit=1, fail_on_cache_limit_hit=True))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with one_thread():
        yield
    torch._dynamo.reset()


def _graph_breaks(fn):
    explained = torch._dynamo.explain(fn)()
    return explained.graph_break_count, [b.reason for b in explained.break_reasons]


def _assert_no_graph_breaks(device, backend, warm):
    model, opt = make(device, backend, lr=torch.tensor(LR, device=device))
    loss_of(model, 0, device).backward()
    if warm:
        opt.step()
    opt.grad_scale = torch.tensor(2.0 ** 10, device=device)  # as GradScaler sets them
    opt.found_inf = torch.tensor(0.0, device=device)
    breaks, reasons = _graph_breaks(opt.step)
    assert breaks == 0, reasons
    assert "max_norm" in opt.state[model.lin.weight] and "sr_seed" in opt.state[model.low]


@pytest.mark.backends(reference=False)  # the interpreter too: the same host code and custom ops as on CUDA
def test_step_has_no_graph_breaks(device, backend):
    _assert_no_graph_breaks(device, backend, warm=True)


def test_a_step_that_creates_state_has_no_graph_breaks():
    _assert_no_graph_breaks("cpu", "foreach", warm=False)


@pytest.mark.parametrize("dtype,on", [(torch.float64, "foreach"), (torch.float32, "cpu")])
@pytest.mark.parametrize("rule,options", [("lars", dict(momentum=0.0)), ("lars", dict(momentum=0.9)),
                                          ("lamb", dict(caution=True, max_grad_norm=0.5)),
                                          ("lamb", dict(weight_decay=0.0))],
                         ids=["lars", "lars-momentum", "lamb-caution-clip", "lamb-adam"])
def test_the_other_rules_have_no_graph_breaks(rule, options, dtype, on):
    # LARS and LAMB on the cpu backend's kernels (float32; their optional lists present or not, LAMB's
    # combined clip divisor and per-group values), and float64 groups, which the kernels do not take,
    # on the fallback backend. The compiled step builds its plan while traced: which backend takes a
    # group, and the fallback itself, must be decided without host work dynamo cannot trace (file
    # reads, module discovery).
    from fromage_fused.rules.lamb import LAMB
    from fromage_fused.rules.lars import LARS

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in [(6, 5), (5,)]]
    cls = {"lars": LARS, "lamb": LAMB}[rule]
    opt = cls(params, lr=torch.tensor(0.1), **dict(dict(weight_decay=1e-2), **options), backend="cpu")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
    opt.step()
    assert {g.backend.name for g in opt._plan.groups} == {on}
    breaks, reasons = _graph_breaks(opt.step)
    assert breaks == 0, reasons


def test_compiled_triton_step_matches_eager():
    triton_on_cpu()
    # The triton phases are opaque custom ops to the compiler: fullgraph holds and the compiled step
    # runs the same kernels (here under the interpreter) on the same tables.
    runs = []
    for compiled in (False, True):
        model, opt = make("cpu", "triton", lr=torch.tensor(LR))
        loss_of(model, 0).backward()
        opt.step()  # state first: one compile
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        with torch._dynamo.config.patch(**ONE_COMPILE):
            for i in range(3):
                opt.zero_grad(set_to_none=True)
                loss_of(model, i + 1).backward()
                step()
        runs.append(snapshot(model, opt))
    assert_same(runs[0], runs[1], exact=False, tol=COMPILE_TOL)


def test_compiled_training_step_matches_eager():
    # aot_eager traces forward, backward and the step exactly as inductor would receive them,
    # at a fraction of the compile time; the inductor path runs in test_guide.py.
    runs = []
    for compiled in (False, True):
        model, opt = make(lr=torch.tensor(LR))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)

        def train_step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = loss_from(model, x, y)
            loss.backward()
            opt.step()
            return loss

        train_step(*batch(STEPS))  # an eager step creates the state: one compile, not two
        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        with torch._dynamo.config.patch(**ONE_COMPILE):
            for step in range(STEPS):
                fn(*batch(step))
                sched.step()
        runs.append(snapshot(model, opt))
    assert_same(runs[0], runs[1], exact=False, tol=COMPILE_TOL)



def test_inductor_step_matches_eager():
    # The optimizer step alone through inductor, fullgraph, on one bf16 tensor with max_norm and
    # stochastic rounding (the fp32 path runs through inductor in test_guide.py); the lr tensor
    # changes in place half-way.
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))
        opt = Fromage([p], lr=torch.tensor(LR), p_bound=1.0, stochastic_rounding=True, seed=3, backend="foreach")
        grads = torch.randn(STEPS + 1, 300).to(torch.bfloat16)
        p.grad = grads[STEPS]
        opt.step()  # state first: one compile
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        with torch._dynamo.config.patch(**ONE_COMPILE):
            for i in range(STEPS):
                p.grad = grads[i]
                step()
                if i == STEPS // 2:
                    opt.param_groups[0]["lr"].fill_(LR / 3)
        runs.append((p.detach().clone(), opt.state[p]["max_norm"].clone(), opt.state[p]["sr_seed"].clone()))
    (p0, m0, s0), (p1, m1, s1) = runs
    atol, rtol = COMPILE_TOL[torch.bfloat16]
    torch.testing.assert_close(p1, p0, atol=atol, rtol=rtol)
    assert torch.equal(m1, m0) and torch.equal(s1, s0)
