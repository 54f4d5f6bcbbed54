"""No backend but the reference reads a tensor value on the host during a step.

Every Python-level way of reading a value is patched to raise while the step runs; the reference
backend, which does read values, proves that the patch bites.
"""
import pytest
import torch
from torch import nn

import fromage_fused
from fromage_fused import Fromage, functional
from fromage_fused.functional import UNSET_MAX_NORM
from _host_reads import READERS, HostRead, forbid_cuda_sync, forbid_host_reads



def model(device):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)).to(device)
    nn.init.zeros_(net[2].bias)
    extra = nn.ParameterList([
        nn.Parameter(torch.randn(4, dtype=torch.complex64, device=device)),
        nn.Parameter(torch.randn(6, dtype=torch.bfloat16, device=device)),
        nn.Parameter(torch.randn(2, 3, dtype=torch.float64, device=device)),
        nn.Parameter(torch.zeros(0, device=device)),
    ])
    return net, extra


def fill_grads(net, extra, step):
    net.zero_grad(set_to_none=True)
    net(torch.randn(8, 5, device=net[0].weight.device)).square().sum().backward()
    for i, p in enumerate(extra):
        p.grad = torch.zeros_like(p) if (i + step) % 3 == 0 else torch.randn_like(p)
    if step % 2:
        net[1].weight.grad = None  # a parameter without a gradient this step


@pytest.mark.backends(reference=False)  # CUDA rows carry the gpu marker: `pytest -m gpu` runs them
@pytest.mark.parametrize("p_bound", [None, 1.0])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_optimizer_step_reads_nothing_on_the_host(backend, device, p_bound, tensor_lr):
    net, extra = model(device)
    lr = torch.tensor(0.01, device=device) if tensor_lr else 0.01
    opt = Fromage([{"params": net.parameters()}, {"params": extra.parameters(), "lr": lr}],
                  lr=lr, p_bound=p_bound, backend=backend)
    for step in range(3):
        fill_grads(net, extra, step)
        before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
        with forbid_host_reads():
            opt.step()
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, opt.param_groups[0]["params"]))


@pytest.mark.backends(reference=False)  # CUDA rows carry the gpu marker: `pytest -m gpu` runs them
def test_functional_with_loss_scaling_reads_nothing_on_the_host(backend, device):
    params = [torch.randn(5, device=device), torch.zeros(3, device=device), torch.randn(2, 2, device=device)]
    grads = [torch.randn_like(p) * 1024 for p in params]
    grads[2].zero_()
    mn = [torch.full((), UNSET_MAX_NORM, device=device) for _ in params]
    for found in (0.0, 1.0):
        with forbid_host_reads():
            functional.fromage(params, grads, mn, lr=torch.tensor(0.01, device=device), p_bound=1.0,
                               maximize=False, backend=backend,
                               found_inf=torch.tensor(found, device=device),
                               grad_scale=torch.tensor(1024.0, device=device))


@pytest.mark.parametrize("p_bound", [None, 1.0])
def test_the_patch_catches_the_reference_backend(p_bound):
    net, extra = model("cpu")
    opt = Fromage(net.parameters(), p_bound=p_bound, backend="reference")
    fill_grads(net, extra, 0)
    with forbid_host_reads(), pytest.raises(HostRead):
        opt.step()


def test_the_patch_catches_each_reader():
    t = torch.tensor([1.5])
    probes = {"item": lambda: t.item(), "tolist": lambda: t.tolist(), "numpy": lambda: t.numpy(),
              "__bool__": lambda: bool(t), "__float__": lambda: float(t), "__int__": lambda: int(t),
              "__index__": lambda: [0, 1][t.long()], "__complex__": lambda: complex(t),
              "__format__": lambda: f"{t:.2f}", "__repr__": lambda: repr(t), "__str__": lambda: str(t),
              "__array__": lambda: __import__("numpy").asarray(t)}
    assert set(probes) == set(READERS)
    with forbid_host_reads():
        for name, probe in probes.items():
            with pytest.raises(HostRead):
                probe()
    assert t.item() == 1.5  # restored afterwards


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in fromage_fused.backend_names() if b != "reference"])
@pytest.mark.parametrize("p_bound", [None, 1.0])
def test_cuda_step_does_not_synchronise(backend, p_bound):
    if backend not in fromage_fused.available_backends("cuda"):
        pytest.skip(f"{backend} does not run on CUDA here")
    net, extra = model("cuda")
    opt = Fromage(list(net.parameters()) + list(extra.parameters()), lr=torch.tensor(0.01, device="cuda"),
                  p_bound=p_bound, backend=backend)
    fill_grads(net, extra, 0)
    opt.step()  # first step: state creation and lazy loading happen outside the checked region
    fill_grads(net, extra, 1)
    with forbid_cuda_sync():
        opt.step()
