"""Tensors of a step that share memory: a parameter twice (or tied storage, or overlapping views) is
refused before anything changes, naming both; a gradient that is its own parameter's memory steps
exactly as a separate copy would; a gradient in another parameter's memory is refused."""
import warnings

import pytest
import torch
from torch import nn

import _triton_interpreter  # noqa: F401  (triton among the backends on a machine without CUDA)
import fromage_fused
from fromage_fused import Fromage, functional
from fromage_fused._overlap import first_overlap

BACKENDS = fromage_fused.available_backends("cpu")


def _steps_refused(opt, params, match):
    before = [p.detach().clone() for p in params]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[p][k], v) for p in params for k, v in state.get(id(p), {}).items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_parameter_twice_is_refused(backend):
    p = nn.Parameter(torch.randn(7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "duplicate parameters" warning
        opt = Fromage([p, p], lr=0.1, p_bound=2.0, backend=backend)
    p.grad = torch.randn(7)
    _steps_refused(opt, [p], "parameter 0 of param group 0 and parameter 1 of param group 0 share memory")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_storage_across_groups_is_refused(backend):
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 6), nn.Linear(4, 6)
    dec.weight.data = enc.weight.data  # tying by storage: two Parameters, one memory
    opt = Fromage([{"params": enc.parameters()}, {"params": dec.parameters(), "lr": 0.02}], backend=backend)
    (enc(torch.randn(3, 4)).sum() + dec(torch.randn(3, 4)).sum()).backward()
    _steps_refused(opt, list(enc.parameters()) + list(dec.parameters()),
                   "parameter 0 of param group 0 and parameter 0 of param group 1 share memory")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_views_are_refused_and_adjacent_ones_step(backend):
    base = torch.randn(20)
    p, q = nn.Parameter(base[:12]), nn.Parameter(base[8:])
    opt = Fromage([p, q], lr=0.1, backend=backend)
    p.grad, q.grad = torch.randn(12), torch.randn(12)
    _steps_refused(opt, [p, q], "parameter 0 of param group 0 and parameter 1 of param group 0 share memory")
    # views side by side share a storage, not memory: they step as separate tensors do
    base = torch.randn(20)
    views = [nn.Parameter(base[:12]), nn.Parameter(base[12:])]
    copies = [nn.Parameter(v.detach().clone()) for v in views]
    for params in (views, copies):
        opt = Fromage(params, lr=0.1, backend=backend)
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, float(i + 1))
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(views, copies))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_in_another_parameters_memory_is_refused(backend):
    p, q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    opt = Fromage([p, q], lr=0.1, backend=backend)
    p.grad, q.grad = torch.randn(5), p.detach()  # read after p has been stepped
    _steps_refused(opt, [p, q], "gradient of parameter 1 of param group 0 shares memory with parameter 0")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_may_share_memory_with_each_other(backend):
    p, q = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    g = torch.randn(5)
    p.grad, q.grad = g, g  # read only
    Fromage([p, q], lr=0.1, backend=backend).step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p_bound", [None, 1.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_that_is_its_parameter_steps_as_a_copy_would(backend, p_bound, dtype):
    # p.grad = p.detach(): the in-place path must read the gradient before it scales p
    torch.manual_seed(0)
    aliased = [nn.Parameter(torch.randn(300, dtype=dtype)), nn.Parameter(torch.randn(7, 3, dtype=dtype))]
    copied = [nn.Parameter(p.detach().clone()) for p in aliased]
    for params, alias in ((aliased, True), (copied, False)):
        opt = Fromage(params, lr=0.1, p_bound=p_bound, backend=backend)
        for _ in range(3):
            for p in params:
                p.grad = p.detach() if alias else p.detach().clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(aliased, copied))


def test_the_functional_step_refuses_shared_memory_too():
    p = torch.randn(6)
    before = p.clone()
    with pytest.raises(RuntimeError, match="parameter 0 and parameter 1 share memory"):
        functional.fromage([p, p], [torch.randn(6), torch.randn(6)], None, lr=0.1, backend="foreach")
    assert torch.equal(p, before)


def test_first_overlap_finds_any_overlap_among_many():
    # one sort and one sweep: any pair, wherever it sits among many disjoint ranges
    base = torch.zeros(10_000)
    disjoint = [base[i * 10:(i + 1) * 10] for i in range(1000)]
    assert first_overlap(disjoint) is None
    for a, b in ((0, 999), (500, 3), (998, 999)):
        tensors = list(disjoint)
        tensors[b] = base[a * 10 + 9:a * 10 + 19] if a < 999 else base[a * 10:a * 10 + 1]
        assert first_overlap(tensors) is not None
    read_only = [base[:10], base[5:15]]
    assert first_overlap(read_only, [False, False]) is None and first_overlap(read_only, [False, True]) == (0, 1)
    assert first_overlap([base[:10], torch.zeros(10)]) is None  # another storage
