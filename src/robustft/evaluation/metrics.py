"""Top-k accuracy under the shift-suite protocols: class subsets and multi-label sets.

Every evaluation set names, for each of its labels, the head classes that count as a
correct prediction (one class for ImageNet, several for some ObjectNet classes), and
optionally the head classes the prediction may choose from (the 200 ImageNet-R/-A
classes, the ObjectNet-mapped classes). :class:`Scorer` turns both into tensors once per
set, so scoring a batch is a handful of vectorised ops with no per-sample Python.
:class:`AccuracyMeter` sums the counts on the device and reduces them across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from robustft.errors import DataError, ModelError

if TYPE_CHECKING:
    from robustft.distributed import DistEnv

__all__ = ["build_correct_matrix", "topk_correct", "Scorer", "AccuracyMeter"]


def build_correct_matrix(label_sets: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """Which head classes count as correct for each dataset label.

    Args:
        label_sets: For each dataset label, the head-class indices that are correct.
        num_classes: Number of head classes C (the width of the logits).

    Returns:
        Bool tensor [num_labels, C]; row ``l`` is True at the classes correct for label ``l``.

    Raises:
        DataError: A label set is empty or names a class outside ``[0, C)``.
    """
    matrix = torch.zeros(len(label_sets), num_classes, dtype=torch.bool)
    for label, classes in enumerate(label_sets):
        classes = list(classes)
        if not classes:
            raise DataError(f"label {label} has no correct head class; every label needs at least one")
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ModelError(
                f"label {label} maps to head classes {bad}, but the model's head has {num_classes} classes; "
                "the dataset's class list does not match the model's head"
            )
        matrix[label, classes] = True
    return matrix


def topk_correct(
    logits: torch.Tensor,
    label_sets_batch: torch.Tensor,
    k: int,
    class_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Whether any of the top-k predictions is one of the sample's correct classes.

    Args:
        logits: [B, C] scores over all head classes.
        label_sets_batch: Bool [B, C], True at the head classes correct for each sample
            (rows of :func:`build_correct_matrix` indexed by the batch labels).
        k: How many top predictions to consider (>= 1). Clipped to the number of allowed
            classes, so top-5 over a 3-class subset is always correct.
        class_indices: Long [S], the head classes the prediction may choose from (top-k is
            taken over this subset and mapped back to head indices), or None for all C.

    Returns:
        Bool [B]: True where a correct class is among the top-k allowed predictions.
    """
    if class_indices is not None:
        logits = logits.index_select(1, class_indices)
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # [B, k], indices into the (sub)set
    if class_indices is not None:
        top = class_indices[top]  # back to head indices
    return label_sets_batch.gather(1, top).any(dim=1)


class Scorer:
    """Scores batches of logits for one evaluation set (precomputed tensors, any device).

    Args:
        label_sets: For each dataset label, the correct head classes.
        num_classes: Number of head classes C.
        class_indices: Head classes allowed in the prediction, or None for all.
        ks: The k of each top-k accuracy to count.
        device: Where the logits will be.
    """

    def __init__(
        self,
        label_sets: Sequence[Sequence[int]],
        num_classes: int,
        class_indices: Sequence[int] | None = None,
        ks: Sequence[int] = (1, 5),
        device: torch.device | str = "cpu",
    ) -> None:
        self.correct = build_correct_matrix(label_sets, num_classes).to(device)
        self.class_indices: torch.Tensor | None = None
        if class_indices is not None:
            allowed = list(class_indices)
            bad = [c for c in allowed if not 0 <= c < num_classes]
            if bad or not allowed:
                raise ModelError(
                    f"class subset {bad or allowed} does not fit a head of {num_classes} classes; "
                    "the dataset's class list does not match the model's head"
                )
            self.class_indices = torch.tensor(allowed, dtype=torch.long, device=device)
        self.ks = tuple(ks)
        self.num_classes = num_classes

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Count correct predictions in one batch.

        Args:
            logits: [B, C] head scores.
            labels: Long [B] dataset labels (row indices of the correct matrix).

        Returns:
            Long [len(ks)]: correct top-k counts for each k, on the logits' device.
        """
        if logits.shape[1] != self.num_classes:
            raise ModelError(
                f"the model outputs {logits.shape[1]} classes but the dataset expects a head of "
                f"{self.num_classes}; evaluate with a classifier built on the dataset's class names"
            )
        # Ties and bf16 rounding: rank in fp32 so top-k does not depend on the autocast dtype
        # of the last layer more than the logits themselves do.
        logits = logits.float()
        sets = self.correct.index_select(0, labels)
        counts = [topk_correct(logits, sets, k, self.class_indices).sum() for k in self.ks]
        return torch.stack(counts)


class AccuracyMeter:
    """Sums top-k correct counts, the sample count and the unreadable-image count.

    Counts stay on the device as int64 (exact; no host sync per batch) and are summed
    over processes once, in :meth:`reduce`.

    Args:
        ks: The k of each top-k accuracy.
        device: Where the counts live (the device of the logits).
    """

    def __init__(self, ks: Sequence[int] = (1, 5), device: torch.device | str = "cpu") -> None:
        self.ks = tuple(ks)
        # Layout: [n, n_bad, correct@k for each k].
        self._counts = torch.zeros(2 + len(self.ks), dtype=torch.long, device=device)

    def update(self, correct: torch.Tensor, n: int, n_bad: int = 0) -> None:
        """Add one batch.

        Args:
            correct: Long [len(ks)] correct counts (from :class:`Scorer`).
            n: Number of scored samples in the batch.
            n_bad: Number of unreadable samples dropped from the batch.
        """
        self._counts[0] += n
        self._counts[1] += n_bad
        self._counts[2:] += correct.to(self._counts.device, torch.long)

    def reduce(self, dist_env: DistEnv | None = None) -> dict[str, int]:
        """Sum the counts over all processes (every rank must call this).

        Returns:
            ``{"n", "n_bad", "top1", "top5", ...}`` as integer counts of the whole dataset.
        """
        counts = self._counts.clone()
        if dist_env is not None and dist_env.world_size > 1:
            reduced = dist_env.all_reduce_sum(counts)
            counts = reduced if reduced is not None else counts
        values = counts.cpu().tolist()
        out = {"n": values[0], "n_bad": values[1]}
        out.update({f"top{k}": v for k, v in zip(self.ks, values[2:], strict=True)})
        return out

    def accuracies(self, dist_env: DistEnv | None = None) -> dict[str, float]:
        """Reduced top-k accuracies in percent, plus the counts ``n`` and ``n_bad``."""
        counts = self.reduce(dist_env)
        n = counts["n"]
        out: dict[str, float] = {"n": n, "n_bad": counts["n_bad"]}
        for k in self.ks:
            out[f"top{k}"] = 100.0 * counts[f"top{k}"] / n if n else float("nan")
        return out
