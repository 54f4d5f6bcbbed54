"""The foreach backend's temporaries: at most one tensor's bytes at a time (the product c_g g of a
float32 step; bf16 copies, p_bound's inner products, found_inf), measured with the profiler's
allocator events on CPU. Stochastic rounding (whole tensors, its integer hash) is outside the bound."""
import pytest
import torch

from fromage_fused.rules.fromage import phases
from torch.profiler import ProfilerActivity, profile

from fromage_fused.backends import foreach
from fromage_fused.functional import UNSET_MAX_NORM

SIZES = (4096,) * 6 + (3000, 16384, 1)


def _peak(fn):
    """Peak of bytes allocated and not yet freed while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p_bound", [None, 1.0])
@pytest.mark.parametrize("found_inf", [False, True])
def test_transient_memory_is_at_most_one_tensor(dtype, p_bound, found_inf, monkeypatch):
    monkeypatch.setattr(foreach, "FLOOR_BYTES", 0, raising=False)  # the bound itself, not the 16 MiB floor
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    max_norm = torch.full((len(params),), UNSET_MAX_NORM) if p_bound else None
    lr = torch.tensor(0.01)
    flag = torch.tensor(0.0) if found_inf else None
    backend = foreach.BACKEND

    def step():
        stats = phases.stats(backend, params, grads, inner=p_bound is not None)
        phases.apply(backend, params, grads, stats, lr=lr, max_norm=max_norm, p_bound=p_bound, maximize=False,
                     found_inf=flag)

    step()  # the coefficient buffer exists from the first step on
    largest = max(p.numel() * p.element_size() for p in params)
    small = 64 * 1024  # the [n, 3] stats, coefficients and 0-d results of the step
    peak = _peak(step)
    assert peak <= largest + small, f"{peak} bytes of temporaries, the largest tensor has {largest}"
