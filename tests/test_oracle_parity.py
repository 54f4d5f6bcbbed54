"""Every backend that runs here against the float64 oracle, over many steps."""
import pytest
import torch

import fromage_fused
from _oracle import compare_with_oracle
from tolerances import ORACLE_TOL

CPU_BACKENDS = [b for b in fromage_fused.available_backends("cpu") if b != "reference"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", list(ORACLE_TOL))
@pytest.mark.parametrize("p_bound", [None, 1.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_backend_matches_oracle(backend, dtype, p_bound, maximize):
    compare_with_oracle(backend, dtype, p_bound=p_bound, maximize=maximize, tol=ORACLE_TOL[dtype])
