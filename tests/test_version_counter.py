"""A step writes its parameters in place, so a backward through a graph that saved a parameter
before the step must raise, as it does after torch's own optimizers (they bump the version
counters their kernels write): on every backend, every dtype, with and without p_bound."""
import pytest
import torch
from torch import nn

import _triton_interpreter  # noqa: F401  (triton among the backends on a machine without CUDA)
import fromage_fused
from fromage_fused import Fromage, functional

BACKENDS = fromage_fused.available_backends("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.complex64]


@pytest.mark.parametrize("p_bound", [None, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_after_a_step_raises(backend, dtype, p_bound):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3, dtype=torch.complex64 if dtype.is_complex else torch.float32).to(dtype))
    other = nn.Parameter(torch.randn(4))  # a second group (of another dtype, for most cases)
    opt = Fromage([w, other], lr=0.1, p_bound=p_bound, backend=backend)
    (w * w).abs().sum().backward()
    other.grad = torch.randn(4)
    loss = (w * w).abs().sum()  # saves w
    before = w._version
    opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_functional_step_bumps_too(backend):
    p = torch.randn(6, requires_grad=True)
    loss = (p * p).sum()
    with torch.no_grad():
        functional.fromage([p], [torch.randn(6)], None, lr=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
