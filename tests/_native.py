"""Shared by the tests of the C++/CUDA extension: load it, or skip (fail under $FROMAGE_FUSED_REQUIRE_EXT)."""
import os

import pytest
import torch

from fromage_fused.backends import native


def require_native():
    """Load the extension; a build failure skips the test, or fails it when CI requires the extension."""
    try:
        return native.load()
    except Exception as exc:  # BackendUnavailable, or RuntimeError under the env var
        if os.environ.get(native.REQUIRE_ENV, "").strip() not in ("", "0"):
            pytest.fail(f"the C++ extension is required ({native.REQUIRE_ENV}) but failed: {exc}")
        pytest.skip(f"C++ extension unavailable: {exc}")


def fromage_stats_op(params, grads, inner=True, *, ops=None):
    """Fromage's pass 0 through the extension's engine op, the arguments as the cpu and cuda
    backends pass them."""
    from fromage_fused.rules.fromage.flags import INNER

    device = params[0].device if params else "cpu"
    hyper = torch.zeros(2, device=device)
    return (ops or torch.ops.fromage_fused).pass_("fromage", 0, [], list(params) + list(grads), None, hyper,
                                                  INNER if inner else 0, [], None, None, None, None, 0)


def fromage_apply_op(params, grads, stats, lr, max_norm, p_bound, maximize, prefactor, found_inf, grad_scale,
                     sr_seed, *, ops=None):
    """Fromage's pass 1 through the extension's engine op (``max_norm`` an ``[n]`` tensor or None)."""
    from fromage_fused.rules.fromage.flags import BOUND, INNER, MAXIMIZE, PREFACTOR

    hyper = torch.stack([lr.reshape(()), torch.full((), 0.0 if p_bound is None else p_bound, dtype=lr.dtype,
                                                       device=lr.device)])
    flags = (MAXIMIZE if maximize else 0) | (PREFACTOR if prefactor else 0)
    flags |= (BOUND | INNER) if p_bound is not None else 0
    scalars = [] if max_norm is None else [max_norm]
    return (ops or torch.ops.fromage_fused).pass_("fromage", 1, list(params), list(grads), stats, hyper, flags, scalars,
                                                  None, found_inf, grad_scale, sr_seed, 0)
