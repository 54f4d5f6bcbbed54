"""Norms and inner products of long tensors: summed in pieces and combined as a tree (as the
kernels do), so that the error stays at a few float32 ulps however long the tensor is. One long
accumulation drifts: torch's CPU norm of 4M float32 elements is 1e-4 off in relative terms."""
import pytest
import torch

import fromage_fused
from fromage_fused.backends import get

BACKENDS = [b for b in ("cpu", "foreach", "reference") if b in fromage_fused.available_backends("cpu")]
#: relative error of ||p||^2 and ||g||^2, and of <p, g> relative to ||p|| ||g||: a few float32 ulps
#: of accumulation; bf16 norms go through torch's upcasting norm, which sums its pieces less
#: carefully (still 100 times below a bf16 ulp; the whole tensor at once: 6e-4).
TOL = {torch.float32: 1e-6, torch.bfloat16: 5e-5}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_of_a_long_tensor(backend, dtype, one_thread):
    gen = torch.Generator().manual_seed(0)
    n = 4_000_001
    params = [torch.randn(n, generator=gen).to(dtype), torch.randn(300, generator=gen).to(dtype)]
    grads = [(torch.rand(n, generator=gen) + 1).to(dtype), torch.randn(300, generator=gen).to(dtype)]
    got = get(backend).stats(params, grads, inner=True).double()
    for row, p, g in zip(got, params, grads):
        p, g = p.double(), g.double()
        pp, gg, pg = p.square().sum(), g.square().sum(), (p * g).sum()
        errors = [abs(row[0] - pp) / pp, abs(row[1] - gg) / gg, abs(row[2] - pg) / (pp * gg).sqrt()]
        assert max(errors) <= TOL[dtype], [float(e) for e in errors]
