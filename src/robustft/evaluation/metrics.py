"""Metrics under the benchmarks' protocols: top-k accuracy, macro-F1, worst-group accuracy, calibration.

Every evaluation set names, for each of its labels, the head classes that count as a
correct prediction (one class for ImageNet, several for some ObjectNet classes), and
optionally the head classes the prediction may choose from (the 200 ImageNet-R/-A
classes, the ObjectNet-mapped classes). :class:`Scorer` turns both into tensors once per
set, so scoring a batch is a handful of vectorised ops with no per-sample Python.
:class:`AccuracyMeter` sums the counts on the device and reduces them across processes.

:class:`SetMeter` adds what the other benchmarks report, from sums that are exact over
processes (integer counts, and float64 sums for confidences and log-likelihoods):

- ``macro_f1`` (WILDS iWildCam): the mean over the classes present in the set's labels of
  ``2 TP / (2 TP + FP + FN)``, in percent (scikit-learn's ``f1_score(average="macro",
  labels=unique(y_true))``);
- ``worst_<kind>`` (WILDS FMoW's ``worst_region``, ``worst_year``): the lowest top-1 over the
  groups of a :class:`~robustft.data.datasets.Grouping` that hold images, excluded groups
  left out;
- ``ece``: top-label expected calibration error over the whole set with equal-width bins of
  the maximum softmax probability, ``sum_b |acc_b - conf_b| n_b / n`` (a fraction);
- ``nll``: mean negative log-likelihood of the true class (nats), on single-label sets.

Probabilities are the softmax of the head's logits (in float32) over the classes the
prediction may choose from, so a 200-class subset is calibrated over its 200 classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from robustft.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    from robustft.distributed import DistEnv

__all__ = [
    "build_correct_matrix",
    "topk_correct",
    "Scorer",
    "AccuracyMeter",
    "ECE_BINS",
    "check_ece_bins",
    "calibration_bins",
    "expected_calibration_error",
    "reliability",
    "macro_f1",
    "group_accuracies",
    "SetMeter",
    "SetMetrics",
]

ECE_BINS = 15
"""Equal-width confidence bins of the ECE by default (CaRot's and TRACER's tables use 10)."""


def check_ece_bins(value: object, what: str = "ECE bins", error: type[Exception] = ConfigError) -> int:
    """``value`` if it is a positive integer number of bins, else ``error`` naming ``what`` and the usual values."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{what} {value!r} must be a positive integer (15 by default; CaRot's and TRACER's tables use 10)")
    return value


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
        self.check_width(logits)
        # Ties and bf16 rounding: rank in fp32 so top-k does not depend on the autocast dtype
        # of the last layer more than the logits themselves do.
        logits = logits.float()
        sets = self.correct.index_select(0, labels)
        counts = [topk_correct(logits, sets, k, self.class_indices).sum() for k in self.ks]
        return torch.stack(counts)

    def check_width(self, logits: torch.Tensor) -> None:
        """ModelError unless ``logits`` [B, C] has one column per head class."""
        if logits.shape[1] != self.num_classes:
            raise ModelError(
                f"the model outputs {logits.shape[1]} classes but the dataset expects a head of "
                f"{self.num_classes}; evaluate with a classifier built on the dataset's class names"
            )


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


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor,
                     n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort predictions into ``n_bins`` equal-width confidence bins ``[b/n, (b+1)/n)`` (1.0 in the last).

    Args:
        confidence: [B] maximum softmax probability of each prediction, in [0, 1].
        correct: Bool [B], whether each prediction is correct.
        n_bins: Number of bins (>= 1).

    Returns:
        ``(count long [n_bins], confidence_sum float64 [n_bins], correct_count long [n_bins])``.
    """
    index = (confidence.double() * n_bins).floor().long().clamp_(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    conf_sum.index_add_(0, index, confidence.double())
    hits = torch.bincount(index, weights=correct.double(), minlength=n_bins).round().long()
    return count, conf_sum, hits


def expected_calibration_error(count: Sequence[float] | torch.Tensor, confidence_sum: Sequence[float] | torch.Tensor,
                               correct_count: Sequence[float] | torch.Tensor) -> float:
    """``sum_b |correct_b - confidence_b| / n`` from per-bin sums: ECE as a fraction in [0, 1] (nan for n = 0)."""
    count, conf, hits = (torch.as_tensor(x, dtype=torch.float64).cpu() for x in (count, confidence_sum, correct_count))
    n = float(count.sum())
    return float((hits - conf).abs().sum()) / n if n else float("nan")


def reliability(count: torch.Tensor, confidence_sum: torch.Tensor, correct_count: torch.Tensor) -> dict[str, list[float]]:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (a fraction; 0 for an empty bin): a reliability diagram."""
    n = count.double().cpu()
    safe = n.clamp(min=1)
    return {"count": [int(v) for v in n.tolist()],
            "confidence": (confidence_sum.double().cpu() / safe).tolist(),
            "accuracy": (correct_count.double().cpu() / safe).tolist()}


def macro_f1(tp: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Macro-F1 in percent over the classes that occur among the true labels.

    Args:
        tp: Long [C], correct predictions of each class.
        predicted: Long [C], predictions of each class.
        true: Long [C], true labels of each class.
    """
    tp, predicted, true = (x.double().cpu() for x in (tp, predicted, true))
    present = true > 0
    if not bool(present.any()):
        return float("nan")
    f1 = 2 * tp[present] / (predicted[present] + true[present])  # 2TP / (2TP + FP + FN)
    return 100.0 * float(f1.mean())


def group_accuracies(correct: torch.Tensor, total: torch.Tensor, names: Sequence[str],
                     excluded: Sequence[str] = ()) -> tuple[float, dict[str, float]]:
    """Top-1 per group (percent; groups without images left out) and the minimum over the groups not excluded."""
    correct, total = correct.cpu().tolist(), total.cpu().tolist()
    per = {name: 100.0 * c / t for name, c, t in zip(names, correct, total, strict=True) if t}
    left_out = set(excluded)
    counted = [v for name, v in per.items() if name not in left_out]
    return (min(counted) if counted else float("nan")), per


@dataclass
class SetMetrics:
    """What :class:`SetMeter` found on one set, over all processes.

    Attributes:
        n: Images scored. n_bad: Unreadable images skipped.
        metrics: Metric name -> value (top1/top5/macro_f1/worst_* in percent, ece a fraction, nll in nats).
        groups: Group kind -> group name -> top-1 in percent (groups with images).
        reliability: Per-bin ``count``, ``confidence`` and ``accuracy`` (see :func:`reliability`).
    """

    n: int
    n_bad: int
    metrics: dict[str, float]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    reliability: dict[str, list[float]] | None = None


class SetMeter:
    """Accumulates every metric of one evaluation set's protocol (sums on the device, reduced once).

    Args:
        scorer: The set's :class:`Scorer` (correct classes, allowed classes, the top-k).
        metrics: Extra metrics the protocol reports (``"macro_f1"``, ``"worst_<kind>"``);
            top-k, ``ece`` and (on single-label sets) ``nll`` are always measured.
        groups: Group kind -> ``(names, ids [N] per dataset position, excluded names)``.
        ece_bins: Equal-width confidence bins of the ECE.
        device: Where the logits are.

    Raises:
        DataError: ``macro_f1`` on a multi-label set, a ``worst_<kind>`` without its grouping.
    """

    def __init__(self, scorer: Scorer, *, metrics: Sequence[str] = (),
                 groups: Mapping[str, tuple[Sequence[str], Sequence[int], Sequence[str]]] | None = None,
                 ece_bins: int = ECE_BINS, device: torch.device | str = "cpu") -> None:
        self.scorer, self.ece_bins = scorer, check_ece_bins(ece_bins, error=DataError)
        self.metrics = tuple(metrics)
        groups = dict(groups or {})
        self.single_label = bool((scorer.correct.sum(dim=1) == 1).all())
        for name in self.metrics:
            kind = name.removeprefix("worst_")
            if name == "macro_f1" and not self.single_label:
                raise DataError("macro-F1 needs one correct class per label; this set has multi-label classes")
            if name.startswith("worst_") and kind not in groups:
                raise DataError(f"metric {name!r} needs a {kind!r} grouping of the images; the set has "
                                f"{sorted(groups) or 'none'}")
        self.groups = {kind: (list(names), torch.as_tensor(list(ids), dtype=torch.long, device=device), tuple(excl))
                       for kind, (names, ids, excl) in groups.items()}
        c = scorer.num_classes
        allowed = scorer.class_indices
        # Position of each head class among the allowed classes (-1: not allowed), for the NLL.
        if allowed is None:
            self._position = torch.arange(c, device=device)
        else:
            self._position = torch.full((c,), -1, dtype=torch.long, device=device)
            self._position[allowed] = torch.arange(allowed.numel(), device=device)
        self._true_class = scorer.correct.float().argmax(dim=1)  # the one class of single-label sets
        # Integer sums: [n, n_bad, top-k..., ECE bin counts, ECE bin hits, tp[C], predicted[C], true[C], groups...].
        ks = len(scorer.ks)
        self._k = ks
        self._counts = torch.zeros(2 + ks + 2 * ece_bins + 3 * c
                                   + sum(2 * len(g[0]) for g in self.groups.values()), dtype=torch.long, device=device)
        self._sums = torch.zeros(ece_bins + 1, dtype=torch.float64, device=device)  # confidence per bin, NLL

    def update(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
               n_bad: int = 0) -> None:
        """Add one batch: ``logits`` [B, C], dataset ``labels`` [B], dataset positions ``index`` [B] (for groups)."""
        counts, sums, ks, bins, c = self._counts, self._sums, self._k, self.ece_bins, self.scorer.num_classes
        self.count_bad(n_bad)
        if logits.shape[0] == 0:
            return
        scorer = self.scorer
        scorer.check_width(logits)
        # One ranking serves every top-k, the top-1 of the calibration and the F1 counts (in fp32,
        # over the allowed classes, as Scorer ranks).
        allowed = scorer.class_indices
        sub = logits.float()
        sub = sub.index_select(1, allowed) if allowed is not None else sub
        top = sub.topk(min(max(scorer.ks), sub.shape[1]), dim=1).indices
        ranked = allowed[top] if allowed is not None else top
        in_set = scorer.correct.index_select(0, labels).gather(1, ranked)  # [B, k]: a correct class at rank j
        pred, hit = ranked[:, 0], in_set[:, 0]
        log_p = torch.log_softmax(sub, dim=1)
        counts[0] += logits.shape[0]
        counts[2:2 + ks] += torch.stack([in_set[:, :k].any(dim=1).sum() for k in scorer.ks])
        count, conf_sum, hits = calibration_bins(log_p.gather(1, top[:, :1]).squeeze(1).exp(), hit, bins)
        at = 2 + ks
        counts[at:at + bins] += count
        counts[at + bins:at + 2 * bins] += hits
        sums[:bins] += conf_sum
        at += 2 * bins
        if self.single_label:
            true = self._true_class.index_select(0, labels)
            sums[bins] -= log_p.gather(1, self._position[true][:, None]).double().sum()
            counts[at:at + c] += torch.bincount(pred[hit], minlength=c)
            counts[at + c:at + 2 * c] += torch.bincount(pred, minlength=c)
            counts[at + 2 * c:at + 3 * c] += torch.bincount(true, minlength=c)
        at += 3 * c
        for names, ids, _ in self.groups.values():
            if index is None:
                raise DataError("group metrics need each image's position in the set (the loader's 'index')")
            g = ids.index_select(0, index.to(ids.device))
            keep = g >= 0
            counts[at:at + len(names)] += torch.bincount(g[keep], weights=hit[keep].double(),
                                                         minlength=len(names)).round().long()
            counts[at + len(names):at + 2 * len(names)] += torch.bincount(g[keep], minlength=len(names))
            at += 2 * len(names)

    def count_bad(self, n_bad: int) -> None:
        """Add ``n_bad`` unreadable images (a batch with none readable needs only this)."""
        self._counts[1] += n_bad

    def result(self, dist_env: DistEnv | None = None) -> SetMetrics:
        """Reduce over processes (every rank must call this) and compute the metrics."""
        counts, sums = self._counts.clone(), self._sums.clone()
        if dist_env is not None and dist_env.world_size > 1:
            dist_env.all_reduce_sum(counts)
            dist_env.all_reduce_sum(sums)
        ks, bins, c = self._k, self.ece_bins, self.scorer.num_classes
        n, n_bad = int(counts[0]), int(counts[1])
        out: dict[str, float] = {f"top{k}": (100.0 * int(v) / n if n else float("nan"))
                                 for k, v in zip(self.scorer.ks, counts[2:2 + ks].tolist(), strict=True)}
        at = 2 + ks
        bin_count, bin_hits = counts[at:at + bins], counts[at + bins:at + 2 * bins]
        out["ece"] = expected_calibration_error(bin_count, sums[:bins], bin_hits)
        at += 2 * bins
        if self.single_label:
            out["nll"] = float(sums[bins]) / n if n else float("nan")
        if "macro_f1" in self.metrics:
            out["macro_f1"] = macro_f1(counts[at:at + c], counts[at + c:at + 2 * c], counts[at + 2 * c:at + 3 * c])
        at += 3 * c
        groups: dict[str, dict[str, float]] = {}
        for kind, (names, _, excluded) in self.groups.items():
            worst, per = group_accuracies(counts[at:at + len(names)], counts[at + len(names):at + 2 * len(names)],
                                          names, excluded)
            groups[kind] = per
            if f"worst_{kind}" in self.metrics:
                out[f"worst_{kind}"] = worst
            at += 2 * len(names)
        out = {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v) and k not in ("top1", "top5"))}
        return SetMetrics(n, n_bad, out, groups, reliability(bin_count, sums[:bins], bin_hits) if n else None)
