"""The host code of the CUDA path (csrc/tensor_table.h), checked on the CPU through a test hook.

The tensor table is what the CUDA kernels read instead of their arguments (one launch per phase
for any number of tensors); the cache keeps uploaded tables and must never drop one that a
captured CUDA graph still reads. Both are the very code the CUDA ops run.
"""
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _native import require_native

COLUMNS = 5  # p, g, numel, first block, blocks; then the block -> tensor map (int32)
CUDA_CHUNK = 65536


@pytest.fixture(autouse=True)
def _ext():
    require_native()


def table(p, g, numels, chunk):
    return torch.ops.fromage_fused._cuda_tensor_table(list(p), list(g), list(numels), chunk)


def expected(p, g, numels, chunk):
    """The table by direct enumeration: every (tensor, block) in order, an empty tensor as one block."""
    n = len(numels)
    blocks = [max(1, -(-size // chunk)) for size in numels]
    first = [sum(blocks[:i]) for i in range(n)]
    owner = [t for t in range(n) for _ in range(blocks[t])]
    if len(owner) % 2:
        owner.append(0)  # the last int64 word is half used
    packed = list(struct.unpack(f"<{len(owner) // 2}q", struct.pack(f"<{len(owner)}i", *owner))) if owner else []
    return list(p) + list(g) + list(numels) + first + blocks + packed


def decode(words, n):
    """(per-tensor columns, block -> tensor) from the table's words."""
    cols = [words[c * n:(c + 1) * n] for c in range(COLUMNS)]
    tail = words[COLUMNS * n:]
    owner = list(struct.unpack(f"<{2 * len(tail)}i", struct.pack(f"<{len(tail)}q", *tail))) if tail else []
    return cols, owner


def check(numels, chunk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(numels)
    # Realistic addresses: 47-bit user space, some aligned to 16 bytes and some not.
    p = (torch.randint(1 << 20, 1 << 46, (n,), generator=gen) * 2).tolist()
    g = (torch.randint(1 << 20, 1 << 46, (n,), generator=gen) * 2 + 1).tolist()
    words = table(p, g, numels, chunk)
    assert words == expected(p, g, numels, chunk)
    cols, owner = decode(words, n)
    total = sum(max(1, -(-size // chunk)) for size in numels)
    assert owner[:total] == [t for t in range(n) for _ in range(cols[4][t])]
    # Every block of every tensor exactly once, covering its elements and nothing more.
    for t, size in enumerate(numels):
        mine = [b for b in range(total) if owner[b] == t]
        assert mine == list(range(cols[3][t], cols[3][t] + cols[4][t]))
        spans = [(k * chunk, min(size, (k + 1) * chunk)) for k in range(len(mine))]
        assert sum(hi - lo for lo, hi in spans) == size
    return words


def test_tensors_of_many_blocks_are_cut_in_order():
    words = check([10, 3, 25], chunk=4)
    cols, owner = decode(words, 3)
    assert cols[3] == [0, 3, 4] and cols[4] == [3, 1, 7]
    assert owner[:11] == [0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 2]


def test_empty_tensors_get_one_block():
    # Their block writes the stats row (zeros) and sets the max_norm.
    words = check([0, 7, 0, 0, 1], chunk=4)
    cols, owner = decode(words, 5)
    assert cols[4] == [1, 2, 1, 1, 1]
    assert owner[:6] == [0, 1, 1, 2, 3, 4]


@pytest.mark.parametrize("n", [1, 35, 36, 37, 319, 320, 321, 2048, 5000])
def test_any_number_of_tensors_in_one_table(n):
    # Around the 36-tensor / 320-block limits of the former by-value launch arguments, and beyond.
    check([(i * 37) % 300 for i in range(n)], chunk=64, seed=n)


def test_real_block_size_and_large_tensors():
    words = check([2**31 + 5, CUDA_CHUNK, CUDA_CHUNK + 1, 0, 1], chunk=CUDA_CHUNK)
    cols, _ = decode(words, 5)
    assert cols[4] == [32769, 1, 2, 1, 1]


def test_bad_arguments_are_refused():
    with pytest.raises(RuntimeError, match="positive"):
        table([0], [0], [1], 0)
    with pytest.raises(RuntimeError, match="one address pair"):
        table([0, 1], [0], [1], 4)


@settings(max_examples=60, deadline=None)
@given(numels=st.lists(st.integers(0, 40), min_size=1, max_size=40), chunk=st.integers(1, 9))
def test_table_properties(numels, chunk):
    check(numels, chunk)


# -- the cache of uploaded tables ---------------------------------------------------------------


def trace(capacity, accesses, held_limit=1_000_000):
    """accesses: [(key, capturing)] (key -1: release the held entries) -> (per access: 1 hit, 0 made,
    -1 refused, or the count released; [(key, held)] from least to most recently used)."""
    keys = [k for k, _ in accesses]
    flags = [int(c) for _, c in accesses]
    out = torch.ops.fromage_fused._table_cache_trace(capacity, keys, flags, held_limit)
    hits, rest = out[:len(keys)], out[len(keys):]
    return hits, [(rest[i], bool(rest[i + 1])) for i in range(0, len(rest), 2)]


def test_least_recently_used_entry_is_evicted():
    hits, entries = trace(2, [(1, False), (2, False), (1, False), (3, False), (1, False), (2, False)])
    assert hits == [0, 0, 1, 0, 1, 0]  # 3 evicted 2 (1 had been used since); 2 then evicted 3
    assert entries == [(1, False), (2, False)]


def test_entry_used_under_capture_is_never_evicted():
    # 1 is made eagerly, then read by a capture: a graph holds it from then on.
    hits, entries = trace(2, [(1, False), (1, True), (2, False), (3, False), (4, False), (1, False)])
    assert hits == [0, 1, 0, 0, 0, 1]
    assert (1, True) in entries and len(entries) == 2


def test_entry_made_under_capture_is_held_and_the_cache_grows_when_all_are_held():
    hits, entries = trace(2, [(1, True), (2, True), (3, True), (4, False), (5, False)])
    assert hits == [0, 0, 0, 0, 0]
    assert [k for k, held in entries if held] == [1, 2, 3]
    assert [k for k, held in entries if not held] == [5]  # 4 went: only unheld entries are evicted


def test_held_entries_are_bounded_and_released():
    # Captures on new storage hold new tables; at the limit a capture that needs one more is refused
    # (nothing made, nothing changed), hits on held entries still work, eager use goes on; a release
    # makes them ordinary entries (the oldest past the capacity go).
    hits, entries = trace(2, [(1, True), (2, True), (3, True), (1, True), (4, False), (5, False), (-1, False),
                              (3, True)], held_limit=2)
    assert hits == [0, 0, -1, 1, 0, 0, 2, 0]
    assert entries == [(5, False), (3, True)]


def test_a_cache_serves_many_threads():
    # Threads that miss and evict at once, each checking it got the value of its key.
    wrong, size = torch.ops.fromage_fused._table_cache_threads(4, 6, 3000)
    assert wrong == 0 and size <= 4


def pool_trace(min_free, requests):
    """requests: [(words, capturing)] -> (per request: offset taken, -1 refused, -2 reserved; segments allocated)."""
    out = torch.ops.fromage_fused._staging_pool_trace(min_free, [w for w, _ in requests], [int(c) for _, c in requests])
    return out[:len(requests)], out[len(requests):]


def test_staging_pool_allocates_outside_capture_only():
    got, segments = pool_trace(100, [(5, True), (30, False), (150, True), (60, True), (40, True), (120, False),
                                      (10, True), (10, False)])
    # Nothing set aside yet: refused. Reserve: 2 * max(100, 2 * 30) words. Captures take in order
    # and are refused when they do not fit; a larger table asks for more room, outside capture.
    assert got == [-1, -2, 0, -1, 150, -2, 0, -2]
    assert segments == [200, 480]


@settings(max_examples=60, deadline=None)
@given(min_free=st.integers(0, 50), requests=st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=30))
def test_staging_pool_against_a_model(min_free, requests):
    got, segments = pool_trace(min_free, requests)
    size = used = largest = 0
    want, allocated = [], []
    for words, capturing in requests:
        if capturing:
            if size - used >= words:
                want.append(used)
                used += words
            else:
                want.append(-1)
        else:
            largest = max(largest, words)
            need = max(min_free, 2 * largest)
            if size - used < need:
                size, used = 2 * need, 0
                allocated.append(size)
            want.append(-2)
    assert got == want and segments == allocated


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 4), held_limit=st.integers(0, 5),
       accesses=st.lists(st.tuples(st.integers(-1, 6), st.booleans()), max_size=40))
def test_cache_against_a_model(capacity, held_limit, accesses):
    hits, entries = trace(capacity, accesses, held_limit)
    model = []  # [key, held], least recently used first
    want = []
    for key, capturing in accesses:
        if key == -1:
            want.append(sum(e[1] for e in model))
            for e in model:
                e[1] = False
            del model[:max(0, len(model) - capacity)]
            continue
        found = next((e for e in model if e[0] == key), None)
        if capturing and not (found is not None and found[1]) and sum(e[1] for e in model) >= held_limit:
            want.append(-1)
            continue
        want.append(int(found is not None))
        if found is not None:
            model.remove(found)
            found[1] = found[1] or capturing
            model.append(found)
        else:
            model.append([key, capturing])
            while len(model) > capacity:
                victim = next((e for e in model[:-1] if not e[1]), None)
                if victim is None:
                    break
                model.remove(victim)
    assert hits == want
    assert entries == [tuple(e) for e in model]


def test_empty_lists_never_reach_a_kernel():
    # The dispatcher picks a kernel from the tensors in the lists: with none it refuses the call,
    # so the device kernels need no empty-list path (a backend never sends an empty group).
    with pytest.raises(NotImplementedError, match="no tensor arguments"):
        torch.ops.fromage_fused.stats([], [], True)
