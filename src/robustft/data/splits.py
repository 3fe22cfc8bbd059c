"""Deterministic, class-stratified train / held-out splits.

The ImageNet recipe holds out 10,240 training images for model selection; every class
gives up a share proportional to its size (largest-remainder rounding), and which images
go is drawn from a seeded generator, so the split is the same on every machine and rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from robustft.errors import DataError

__all__ = ["holdout_quotas", "stratified_holdout"]


def holdout_quotas(class_sizes: dict[int, int], n_holdout: int) -> dict[int, int]:
    """Per-class held-out counts proportional to class size, summing to ``n_holdout``.

    Each class gets ``floor(n_holdout * size / total)``; the images left over go one each to
    the classes with the largest remainders (ties: smaller class id first).
    """
    total = sum(class_sizes.values())
    quotas: dict[int, int] = {}
    remainders: list[tuple[int, int]] = []
    for label, size in class_sizes.items():
        # Integer arithmetic: the remainder n_holdout * size mod total is exact.
        quotas[label], rem = divmod(n_holdout * size, total)
        remainders.append((rem, label))
    left = n_holdout - sum(quotas.values())
    for _, label in sorted(remainders, key=lambda x: (-x[0], x[1]))[:left]:
        quotas[label] += 1
    return quotas


def stratified_holdout(labels: Sequence[int], n_holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Split item indices into (train, holdout), stratified by label.

    Args:
        labels: The label of every item, in item order.
        n_holdout: Number of held-out items, in ``[0, len(labels))``.
        seed: Seed of the draw; the same seed and labels always give the same split.

    Returns:
        ``(train_idx, holdout_idx)``: ascending item indices, disjoint, together all items.

    Raises:
        DataError: ``n_holdout`` is negative or leaves no training item.
    """
    n = len(labels)
    if isinstance(n_holdout, bool) or not isinstance(n_holdout, int) or n_holdout < 0:
        raise DataError(f"held-out size must be a non-negative integer, got {n_holdout!r}")
    if n_holdout >= n:
        raise DataError(f"cannot hold out {n_holdout} of {n} images: at least one must stay for training")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[int(label)].append(i)
    quotas = holdout_quotas({c: len(v) for c, v in sorted(by_class.items())}, n_holdout)
    gen = torch.Generator().manual_seed(int(seed))
    held: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = torch.randperm(len(members), generator=gen).tolist()
        held.extend(members[j] for j in order[: quotas[label]])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], sorted(held)
