"""How the CUDA kernels cut a tensor list into launches (csrc/launch_plan.h), checked on the CPU."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _native import require_native


@pytest.fixture(autouse=True)
def _ext():
    require_native()


def plan(numels, chunk, max_tensors, max_blocks):
    rows = torch.ops.fromage_fused.plan_launches(list(numels), chunk, max_tensors, max_blocks)
    return [tuple(rows[i:i + 4]) for i in range(0, len(rows), 4)]  # (launch, slot, tensor, chunk)


def check_plan(numels, chunk, max_tensors, max_blocks):
    rows = plan(numels, chunk, max_tensors, max_blocks)
    want = [(t, c) for t, n in enumerate(numels) for c in range(-(-n // chunk))]
    assert [(t, c) for _, _, t, c in rows] == want  # every chunk once, in order
    launches = sorted({l for l, *_ in rows})
    assert launches == list(range(len(launches)))
    for l in launches:
        mine = [r for r in rows if r[0] == l]
        slots = {}
        for _, s, t, _ in mine:
            assert slots.setdefault(s, t) == t  # a slot holds one tensor
        assert sorted(slots) == list(range(len(slots)))
        assert len(slots) <= max_tensors and len(mine) <= max_blocks
        if l + 1 < len(launches):
            # a launch closes only when its blocks or its tensor slots are full
            next_tensor = next(r[2] for r in rows if r[0] == l + 1)
            blocks_full = len(mine) == max_blocks
            slots_full = len(slots) == max_tensors and next_tensor not in slots.values()
            assert blocks_full or slots_full
    return rows


def test_more_tensors_than_one_launch_holds():
    rows = check_plan([5] * 10, chunk=4, max_tensors=3, max_blocks=100)
    assert max(l for l, *_ in rows) + 1 == 4  # 10 tensors, 3 slots per launch
    assert {t for l, _, t, _ in rows if l == 3} == {9}


def test_tensor_split_across_two_launches():
    rows = check_plan([3, 10, 2], chunk=2, max_tensors=8, max_blocks=4)
    launches_of_1 = sorted({l for l, _, t, _ in rows if t == 1})
    assert launches_of_1 == [0, 1]
    # it resumes in the next launch at the next chunk, in slot 0
    first_of_launch1 = [r for r in rows if r[0] == 1][0]
    assert first_of_launch1 == (1, 0, 1, 2)


def test_empty_tensors_get_no_blocks_and_no_slot():
    rows = check_plan([0, 7, 0, 0, 1], chunk=4, max_tensors=2, max_blocks=8)
    assert {t for _, _, t, _ in rows} == {1, 4}


def test_invalid_sizes_are_rejected():
    with pytest.raises(RuntimeError, match="positive"):
        plan([1], 0, 1, 1)


@settings(max_examples=60, deadline=None)
@given(
    numels=st.lists(st.integers(0, 40), max_size=30),
    chunk=st.integers(1, 8),
    max_tensors=st.integers(1, 5),
    max_blocks=st.integers(1, 12),
)
def test_plan_properties(numels, chunk, max_tensors, max_blocks):
    check_plan(numels, chunk, max_tensors, max_blocks)
