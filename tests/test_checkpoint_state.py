"""Fromage state seen through torch.distributed.checkpoint's state-dict helpers (one process)."""
import pytest
import torch

from fromage_fused import Fromage
from fromage_fused.functional import UNSET_MAX_NORM

state_dict_api = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def _run(steps, p_bound, inspect_first):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    opt = Fromage(model.parameters(), lr=0.1, p_bound=p_bound)
    before = [p.detach().clone() for p in model.parameters()]
    if inspect_first:
        osd = state_dict_api.get_optimizer_state_dict(model, opt)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(),
                                                     before)), "reading the state changed the weights"
        # unset max_norm is saved as such (none at all without p_bound: Fromage then has no state)
        want = {} if p_bound is None else {k: UNSET_MAX_NORM for k in ("0.weight", "0.bias", "1.weight", "1.bias")}
        assert {k: float(s["max_norm"]) for k, s in osd["state"].items()} == want
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(3, 4, generator=gen)).square().mean().backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("p_bound", [0.5, 1.0, None])
def test_state_dict_before_first_step_changes_nothing(p_bound):
    # get_optimizer_state_dict steps an optimizer that has no state (lr=0, zero gradients) to create
    # it; with p_bound < 1 that step would clamp every weight to p_bound times its norm.
    for got, want in zip(_run(3, p_bound, True), _run(3, p_bound, False)):
        assert torch.equal(got, want)
