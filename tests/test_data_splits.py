"""Stratified held-out splits."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robustft.data.splits import holdout_quotas, stratified_holdout
from robustft.errors import DataError


def test_proportional_per_class_and_disjoint() -> None:
    labels = [0] * 10 + [1] * 20 + [2] * 30 + [3] * 40
    train, hold = stratified_holdout(labels, 10, seed=0)
    assert Counter(labels[i] for i in hold) == {0: 1, 1: 2, 2: 3, 3: 4}
    assert sorted(train + hold) == list(range(100)) and not set(train) & set(hold)
    assert train == sorted(train) and hold == sorted(hold)


def test_largest_remainder_rounding() -> None:
    assert holdout_quotas({0: 5, 1: 5, 2: 5}, 2) == {0: 1, 1: 1, 2: 0}  # ties: smaller id first
    assert holdout_quotas({0: 1, 1: 9}, 5) == {0: 1, 1: 4}  # exact 0.5 / 4.5: equal remainders
    assert holdout_quotas({0: 2, 1: 7}, 4) == {0: 1, 1: 3}  # 0.89 / 3.11


def test_deterministic_and_seeded() -> None:
    labels = [i % 7 for i in range(200)]
    assert stratified_holdout(labels, 30, seed=3) == stratified_holdout(labels, 30, seed=3)
    assert stratified_holdout(labels, 30, seed=3)[1] != stratified_holdout(labels, 30, seed=4)[1]


@pytest.mark.parametrize("n", [-1, 5, 6])
def test_bad_sizes(n: int) -> None:
    with pytest.raises(DataError):
        stratified_holdout([0, 0, 1, 1, 2], n, seed=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=80), st.data())
def test_quota_property(labels: list[int], data: st.DataObject) -> None:
    n_hold = data.draw(st.integers(0, len(labels) - 1))
    train, hold = stratified_holdout(labels, n_hold, seed=0)
    assert len(hold) == n_hold and len(train) + len(hold) == len(labels)
    sizes = Counter(labels)
    got = Counter(labels[i] for i in hold)
    for c, size in sizes.items():
        assert abs(got[c] - n_hold * size / len(labels)) < 1
