"""Reading shards and forming micro-batches: `dppo.data`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dppo.data import micro_batches


def test_micro_batches_hand_case():
    # 6 and 4 fill a budget of 10; 5 and 3 share the next, then 2 joins them (best fit)
    assert [b.tolist() for b in micro_batches([5, 6, 3, 4, 2], 10)] == [[1, 3], [0, 2, 4]]
    assert [b.tolist() for b in micro_batches([5, 6, 3, 4, 2], 10, max_items=2)] == [[1, 3], [0, 2], [4]]
    assert [b.tolist() for b in micro_batches([30, 2], 10)] == [[0], [1]]  # too long: alone
    assert micro_batches([], 10) == []


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 120), min_size=0, max_size=60),
    max_tokens=st.integers(1, 200),
    max_items=st.integers(0, 6),
)
def test_micro_batch_invariants(lengths, max_tokens, max_items):
    rows = [b.tolist() for b in micro_batches(lengths, max_tokens, max_items)]
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))  # every example exactly once, none split
    for row in rows:
        assert row == sorted(row)
        assert sum(lengths[i] for i in row) <= max_tokens or len(row) == 1
        assert max_items == 0 or len(row) <= max_items
    if max_items == 0:
        # best fit never leaves two micro-batches that one could hold
        fitting = [sum(lengths[i] for i in row) for row in rows if sum(lengths[i] for i in row) <= max_tokens]
        assert all(a + b > max_tokens for k, a in enumerate(fitting) for b in fitting[k + 1 :])
