"""The reference backend against the literal float64 transcription of the contract, and proof that
the parity harness fails for a backend that gets the rule wrong."""
import pytest
import torch

from _oracle import MIXED_SHAPES, compare_with_oracle, gradient_schedule, literal_step, mixed_tensors, run_functional
from fromage_fused.functional import UNSET_MAX_NORM
from fromage_fused.backends.foreach import ForeachBackend
from fromage_fused.backends.reference import ReferenceBackend
from fromage_fused.rules.fromage import phases
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

    def run_pass(self, rule, index, call):
        if index == 1:
            call.values = dict(call.values, prefactor=False)
        return super().run_pass(rule, index, call)


class _NoClamp(ReferenceBackend):
    name = "no-clamp"

    def run_pass(self, rule, index, call):
        max_norm = call.scalars.get("max_norm")
        if index == 1 and max_norm is not None:  # still records max_norm, but never clamps
            max_norm.masked_fill_(max_norm < 0, 1e30)
        return super().run_pass(rule, index, call)


class _AlwaysScaled(ForeachBackend):
    """Takes the fallback branch's lr for zero-norm tensors as 0 (skips them) instead."""
    name = "no-fallback"

    def run_pass(self, rule, index, call):
        if index == 0:
            return super().run_pass(rule, index, call)
        stats = call.sums
        keep = [i for i in range(call.n) if stats[i, 0] > 0 and stats[i, 1] > 0]
        params, grads = call.lists
        mn = call.scalars.get("max_norm")
        phases.apply(ForeachBackend(), [params[i] for i in keep], [grads[i] for i in keep], stats[keep],
                     lr=call.hyper[0], max_norm=None if mn is None else mn[keep], p_bound=call.values["p_bound"],
                     maximize=call.values["maximize"], prefactor=call.values["prefactor"])


@pytest.mark.parametrize("wrong, p_bound", [(_NoPrefactor(), None), (_NoClamp(), 1.0), (_AlwaysScaled(), None)])
def test_harness_fails_for_a_wrong_backend(wrong, p_bound):
    with pytest.raises(AssertionError):
        compare_with_oracle(wrong, torch.float32, p_bound=p_bound, tol=ORACLE_TOL[torch.float32])


def test_harness_passes_the_right_backend_it_was_given():
    # Same subclassing path as the wrong ones, with nothing changed: the failures above come from the rule.
    compare_with_oracle(ForeachBackend(), torch.float32, p_bound=1.0, tol=ORACLE_TOL[torch.float32])
