"""The update rule on tiny tensors, against values worked out by hand, for every backend here."""
import math

import pytest
import torch

from fromage_fused import Fromage, functional
from fromage_fused.functional import UNSET_MAX_NORM
from tolerances import HAND_TOL

DTYPES = list(HAND_TOL)
LR = 0.1
S = 1 / math.sqrt(1 + LR ** 2)  # the prefactor 1/sqrt(1.01)



def run(backend, dtype, p, g, *, p_bound=None, max_norm=UNSET_MAX_NORM, maximize=False, lr=LR):
    p = torch.tensor(p, dtype=dtype)
    g = torch.tensor(g, dtype=dtype)
    mn = [torch.tensor(max_norm, dtype=torch.float32)] if p_bound is not None else None
    functional.fromage([p], [g], mn, lr=lr, p_bound=p_bound, maximize=maximize, backend=backend)
    return p, (None if mn is None else mn[0].item())


def close(got, want, dtype):
    atol, rtol = HAND_TOL[dtype]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=atol, rtol=rtol)


dtypes = pytest.mark.parametrize("dtype", DTYPES)


@dtypes
def test_scaled_branch(backend, dtype):
    # ||p|| = 5, ||g|| = 2: a = lr * 5/2 = 0.25; p - a g = [3, 3.5].
    p, _ = run(backend, dtype, [3.0, 4.0], [0.0, 2.0])
    close(p, [3 * S, 3.5 * S], dtype)


@dtypes
def test_scaled_branch_ignores_gradient_scale(backend, dtype):
    p, _ = run(backend, dtype, [3.0, 4.0], [0.0, 256.0])
    close(p, [3 * S, 3.5 * S], dtype)


@dtypes
def test_zero_parameter_takes_plain_step(backend, dtype):
    p, _ = run(backend, dtype, [0.0, 0.0, 0.0], [1.0, -2.0, 0.5])
    close(p, [-0.1 * S, 0.2 * S, -0.05 * S], dtype)


@dtypes
def test_zero_gradient_still_shrinks_by_the_prefactor(backend, dtype):
    p, _ = run(backend, dtype, [3.0, 4.0], [0.0, 0.0])
    close(p, [3 * S, 4 * S], dtype)


def test_zero_parameter_and_zero_gradient_stay_zero(backend):
    p, _ = run(backend, torch.float32, [0.0, 0.0], [0.0, 0.0])
    assert p.tolist() == [0.0, 0.0]


@dtypes
def test_maximize_ascends(backend, dtype):
    p, _ = run(backend, dtype, [3.0, 4.0], [0.0, 2.0], maximize=True)
    close(p, [3 * S, 4.5 * S], dtype)


@dtypes
def test_clamp_to_max_norm_set_before_the_update(backend, dtype):
    # max_norm = 1 * ||p|| = 5. g = [-1, 0]: a = 0.5, p - a g = [3.5, 4], norm sqrt(28.25); times S
    # that is 5.289 > 5, so the result is rescaled to norm 5.
    p, mn = run(backend, dtype, [3.0, 4.0], [-1.0, 0.0], p_bound=1.0)
    assert mn == 5.0
    k = 5 / math.sqrt(28.25)
    close(p, [3.5 * k, 4 * k], dtype)


@dtypes
def test_no_clamp_below_max_norm(backend, dtype):
    p, mn = run(backend, dtype, [3.0, 4.0], [-1.0, 0.0], p_bound=2.0)
    assert mn == 10.0
    close(p, [3.5 * S, 4 * S], dtype)


def test_stored_max_norm_is_used_not_remeasured(backend):
    p, mn = run(backend, torch.float64, [3.0, 4.0], [-1.0, 0.0], p_bound=1.0, max_norm=2.5)
    assert mn == 2.5
    k = 2.5 / math.sqrt(28.25)
    close(p, [3.5 * k, 4 * k], torch.float64)


@dtypes
def test_clamp_with_maximize(backend, dtype):
    # maximize: p + a g with a = 0.5 and g = [1, 0] gives the same [3.5, 4] as above.
    p, _ = run(backend, dtype, [3.0, 4.0], [1.0, 0.0], p_bound=1.0, maximize=True)
    k = 5 / math.sqrt(28.25)
    close(p, [3.5 * k, 4 * k], dtype)


@dtypes
def test_zero_initialised_bias_stays_zero_with_p_bound(backend, dtype):
    p, mn = run(backend, dtype, [0.0, 0.0, 0.0], [1.0, -2.0, 0.5], p_bound=1.0)
    assert mn == 0.0
    assert p.tolist() == [0.0, 0.0, 0.0]
    p, _ = run(backend, dtype, p.tolist(), [1.0, -2.0, 0.5], p_bound=1.0, max_norm=mn)
    assert p.tolist() == [0.0, 0.0, 0.0]


def test_lr_zero_changes_nothing(backend):
    p, _ = run(backend, torch.float64, [3.0, 4.0], [0.0, 2.0], lr=0.0)
    assert p.tolist() == [3.0, 4.0]


def test_complex_parameter_uses_its_real_view(backend):
    # p = 3+4j (real view [3, 4]), g = 0+2j (real view [0, 2]): the scaled-branch case above.
    p = torch.tensor([3 + 4j], dtype=torch.complex128)
    g = torch.tensor([2j], dtype=torch.complex128)
    functional.fromage([p], [g], None, lr=LR, p_bound=None, maximize=False, backend=backend)
    torch.testing.assert_close(p, torch.tensor([3 * S + 3.5j * S], dtype=torch.complex128), atol=1e-14, rtol=0)


def test_through_the_optimizer(backend):
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    opt = Fromage([w, b, frozen], lr=LR, p_bound=1.0, backend=backend)
    w.grad = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    b.grad = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt.step()
    k = 5 / math.sqrt(28.25)
    close(w.detach(), [3.5 * k, 4 * k], torch.float64)
    assert b.detach().tolist() == [0.0, 0.0, 0.0]
    assert frozen.detach().tolist() == [1.0, 1.0] and opt.state[frozen]["max_norm"].item() == UNSET_MAX_NORM
    assert opt.state[w]["max_norm"].dtype == torch.float32 and opt.state[w]["max_norm"].item() == 5.0
    assert opt.state[b]["max_norm"].item() == 0.0
