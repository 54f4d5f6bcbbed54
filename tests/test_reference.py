"""The reference backend against the literal float64 transcription of the contract, and proof that
the parity harness fails for a backend that gets the rule wrong."""
import pytest
import torch

from _oracle import MIXED_SHAPES, compare_with_oracle, gradient_schedule, literal_step, mixed_tensors, run_functional
from fromage_fused._math import UNSET_MAX_NORM
from fromage_fused.backends.foreach import ForeachBackend
from fromage_fused.backends.reference import ReferenceBackend
from tolerances import LITERAL_TOL, ORACLE_TOL


@pytest.mark.parametrize("p_bound", [None, 1.0, 0.5, 3.0])
@pytest.mark.parametrize("maximize", [False, True])
def test_reference_equals_literal_step(p_bound, maximize):
    literal = mixed_tensors(torch.float64, seed=1)
    ref = [p.clone() for p in literal]
    mn_literal = [UNSET_MAX_NORM] * len(literal)
    mn_ref = [torch.full((), UNSET_MAX_NORM) for _ in ref]
    for step in range(40):
        lr = (0.01, 0.3, 0.001)[step * 3 // 40]
        grads = gradient_schedule(step, MIXED_SHAPES, seed=1)
        literal_step(literal, grads, mn_literal, lr=lr, p_bound=p_bound, maximize=maximize)
        run_functional(ref, grads, None if p_bound is None else mn_ref,
                       backend="reference", lr=lr, p_bound=p_bound, maximize=maximize)
        for i, (want, got) in enumerate(zip(literal, ref)):
            scale = want.abs().max().item() if want.numel() else 0.0
            torch.testing.assert_close(got, want, rtol=0, atol=LITERAL_TOL * max(scale, 1e-300),
                                       msg=lambda m: f"step {step} tensor {i}: {m}")
    if p_bound is not None:
        assert [m.item() for m in mn_ref] == mn_literal
        # The zero-initialised tensor had max_norm 0 and never moved.
        assert mn_literal[3] == 0.0 and ref[3].abs().max().item() == 0.0


class _NoPrefactor(ForeachBackend):
    name = "no-prefactor"

    def apply(self, *args, **kw):
        kw["prefactor"] = False
        super().apply(*args, **kw)


class _NoClamp(ReferenceBackend):
    name = "no-clamp"

    def apply(self, params, grads, stats, *, max_norm, p_bound, **kw):
        if max_norm is not None:  # still records max_norm, but never clamps
            max_norm.masked_fill_(max_norm < 0, 1e30)
        super().apply(params, grads, stats, max_norm=max_norm, p_bound=p_bound, **kw)


class _AlwaysScaled(ForeachBackend):
    """Takes the fallback branch's lr for zero-norm tensors as 0 (skips them) instead."""
    name = "no-fallback"

    def apply(self, params, grads, stats, **kw):
        keep = [i for i in range(len(params)) if stats[i, 0] > 0 and stats[i, 1] > 0]
        mn = kw.pop("max_norm")
        super().apply([params[i] for i in keep], [grads[i] for i in keep], stats[keep],
                      max_norm=None if mn is None else mn[keep], **kw)


@pytest.mark.parametrize("wrong, p_bound", [(_NoPrefactor(), None), (_NoClamp(), 1.0), (_AlwaysScaled(), None)])
def test_harness_fails_for_a_wrong_backend(wrong, p_bound):
    with pytest.raises(AssertionError):
        compare_with_oracle(wrong, torch.float32, p_bound=p_bound, tol=ORACLE_TOL[torch.float32])


def test_harness_passes_the_right_backend_it_was_given():
    # Same subclassing path as the wrong ones, with nothing changed: the failures above come from the rule.
    compare_with_oracle(ForeachBackend(), torch.float32, p_bound=1.0, tol=ORACLE_TOL[torch.float32])
