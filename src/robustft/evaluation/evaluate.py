"""Evaluate a classifier on a list of evaluation sets (ImageNet, its shifts, user folders).

Each set is read through a non-padded sharded loader (every image is scored by exactly
one process), scored with its own protocol (class subset, multi-label sets, the metrics the
set's benchmark reports; see :mod:`robustft.evaluation.metrics`), and the sums are reduced
over processes, so one process and N processes give the same numbers (integer counts
exactly, float64 sums to rounding). Accuracies are in percent, ECE a fraction, NLL in nats.

Unreadable images are skipped and counted (``EvalResult.n_bad``); their paths are gathered
from every process, listed in ``bad_images_file`` when one is given, and above
``max_bad_fraction`` the evaluation stops with a DataError naming them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from robustft.data.folder import check_bad_fraction, record_bad_paths
from robustft.data.loaders import make_eval_loader
from robustft.errors import ConfigError, DataError, choices_hint
from robustft.evaluation.metrics import ECE_BINS, Scorer, SetMeter, check_ece_bins

if TYPE_CHECKING:
    from robustft.data.datasets import EvalSet
    from robustft.distributed import DistEnv

__all__ = ["EvalResult", "PRECISIONS", "evaluate", "evaluate_set", "ood_average"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one classifier on one evaluation set.

    Attributes:
        dataset: The evaluation set's name (``imagenet``, ``imagenet-r``, a user folder name).
        top1: Top-1 accuracy in percent, in [0, 100].
        top5: Top-5 accuracy in percent, in [0, 100] (top-k over the allowed classes).
        n: Number of images scored, over all processes.
        n_bad: Number of unreadable images skipped (not counted in ``n``).
        protocol: How the set is scored, e.g. ``"200-class subset"`` (from the EvalSet).
        metrics: Every metric measured on the set (``top1``, ``top5``, ``ece``; ``nll`` on
            single-label sets; ``macro_f1``, ``worst_region``, ... where the protocol reports them).
        headline: The metric the literature reports for the set (a key of ``metrics``).
        groups: Group kind -> group name -> top-1 in percent (FMoW's regions and years).
        reliability: Per-bin ``count``, mean ``confidence`` and ``accuracy`` of the ECE's bins.
        ece_bins: Number of equal-width confidence bins of ``metrics["ece"]``.
    """

    dataset: str
    top1: float
    top5: float
    n: int
    n_bad: int
    protocol: str
    metrics: dict[str, float] = field(default_factory=dict)
    headline: str = "top1"
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    reliability: dict[str, list[float]] | None = None
    ece_bins: int = ECE_BINS


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context for ``precision``, chosen once per call of :func:`evaluate`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown evaluation precision {precision!r}; {choices_hint(precision, PRECISIONS)}")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _shard_size(loader: Iterable[Any]) -> int | None:
    """Images this process will read (the progress bar's total), if the loader knows it."""
    sampler = getattr(loader, "sampler", None)
    try:
        return len(sampler) if sampler is not None else None  # type: ignore[arg-type]
    except TypeError:
        return None


def _make_meter(eval_set: EvalSet, num_classes: int, ece_bins: int, device: torch.device) -> SetMeter:
    scorer = Scorer(eval_set.label_sets, num_classes, eval_set.class_indices, (1, 5), device)
    groups = {kind: (g.names, g.ids, g.excluded) for kind, g in eval_set.groups.items()}
    return SetMeter(scorer, metrics=eval_set.metrics, groups=groups, ece_bins=ece_bins, device=device)


def _accumulate(
    classifier: nn.Module,
    loader: Iterable[dict[str, Any]],
    meter: SetMeter,
    autocast: contextlib.AbstractContextManager[Any],
    bar: tqdm,
    device: torch.device,
) -> None:
    """Score every batch of this process's shard into ``meter``."""
    for batch in loader:
        images, n_bad = batch["image"], int(batch["n_bad"])
        if images.shape[0] == 0:  # every image of the batch was unreadable
            meter.count_bad(n_bad)
            bar.update(n_bad)
            continue
        images = images.to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with autocast:
            logits = classifier(images)
        meter.update(logits, labels, batch["index"].to(device, non_blocking=True), n_bad)
        bar.update(images.shape[0] + n_bad)


def evaluate_set(
    classifier: nn.Module,
    eval_set: EvalSet,
    *,
    dist_env: DistEnv,
    batch_size: int,
    workers: int | None = 0,
    precision: str = "fp32",
    progress: bool = True,
    max_bad_fraction: float | None = None,
    bad_images_file: str | Path | None = None,
    bad_fraction_setting: str | None = None,
    ece_bins: int = ECE_BINS,
) -> EvalResult:
    """Evaluate on one set; see :func:`evaluate` (which sets eval and inference mode)."""
    device = torch.device(dist_env.device)
    autocast = _autocast(precision, device)
    loader = make_eval_loader(
        eval_set.dataset, batch_size=batch_size, workers=workers, rank=dist_env.rank, world_size=dist_env.world_size
    )
    # The meter is built before any data is read, from the head's size (every rank alike), so a
    # class list that does not fit the head fails on every rank at once and the sums match.
    num_classes = getattr(classifier, "num_classes", None)
    meter = _make_meter(eval_set, num_classes if isinstance(num_classes, int) else eval_set.num_classes,
                        ece_bins, device)
    show = progress and dist_env.is_primary
    with tqdm(total=_shard_size(loader), desc=f"eval {eval_set.name}", unit="img", disable=not show,
              dynamic_ncols=True) as bar:
        _accumulate(classifier, loader, meter, autocast, bar, device)
    found = meter.result(dist_env)
    if found.n_bad and (max_bad_fraction is not None or bad_images_file is not None):
        # Decided on the summed counts, so every rank gathers (and raises) alike.
        mine = [str(p) for p in eval_set.dataset.bad_paths()] if hasattr(eval_set.dataset, "bad_paths") else []
        paths = sorted({p for part in dist_env.all_gather_object(mine) for p in part})
        if bad_images_file is not None and dist_env.is_primary:
            record_bad_paths(bad_images_file, paths)
        if max_bad_fraction is not None:
            check_bad_fraction(found.n_bad, found.n + found.n_bad, max_bad_fraction, paths,
                               what=eval_set.name, setting=bad_fraction_setting, listing=bad_images_file)
    if found.n == 0:
        raise DataError(f"evaluation set {eval_set.name!r} has no readable images ({found.n_bad} unreadable)")
    result = EvalResult(dataset=eval_set.name, top1=found.metrics["top1"], top5=found.metrics["top5"], n=found.n,
                        n_bad=found.n_bad, protocol=eval_set.protocol, metrics=found.metrics,
                        headline=eval_set.headline, groups=found.groups, reliability=found.reliability,
                        ece_bins=ece_bins)
    if dist_env.is_primary:
        others = "".join(f", {k} {v:.2f}" for k, v in found.metrics.items() if k not in ("top1", "top5", "ece", "nll"))
        logger.info(
            "%s: top-1 %.2f%%, top-5 %.2f%%%s, ECE %.4f on %d images (%s)%s",
            result.dataset, result.top1, result.top5, others, found.metrics.get("ece", float("nan")), result.n,
            result.protocol, f", {result.n_bad} unreadable skipped" if result.n_bad else "",
        )
    return result


def evaluate(
    classifier: nn.Module,
    eval_sets: Sequence[EvalSet],
    *,
    dist_env: DistEnv,
    batch_size: int,
    workers: int | None = 0,
    precision: str = "fp32",
    progress: bool = True,
    max_bad_fraction: float | None = None,
    bad_images_file: str | Path | None = None,
    bad_fraction_setting: str | None = None,
    ece_bins: int = ECE_BINS,
) -> list[EvalResult]:
    """Top-1 and top-5 accuracy of ``classifier`` on each evaluation set.

    Every process must call this with the same sets (the counts are summed over
    processes). The classifier is put in eval mode for the call and its training mode is
    restored afterwards.

    Args:
        classifier: Maps images [B, 3, H, W] in [0, 1] to logits [B, C] (it normalises
            internally), already on ``dist_env.device``.
        eval_sets: The sets to evaluate, in order.
        dist_env: Rank, world size and device of this process.
        batch_size: Images per batch and process.
        workers: Data-loading worker processes per process (0: load in this process,
            None: one per spare core, see ``robustft.data.loaders.default_workers``).
        precision: ``"fp32"`` or ``"bf16"`` (autocast of the forward pass).
        progress: Show a progress bar (images/s) on the primary process.
        max_bad_fraction: Largest tolerated fraction of unreadable images per set, in
            [0, 1] (more raises DataError listing them); None tolerates any number.
        bad_images_file: A text file where the primary process lists every unreadable
            image (one path per line, merged with the paths already there); None: none.
        bad_fraction_setting: Where the user sets the limit (``--max-bad-fraction``), named
            in the error message.
        ece_bins: Equal-width confidence bins of the expected calibration error (15; CaRot's
            and TRACER's tables use 10).

    Returns:
        One :class:`EvalResult` per set, in the order of ``eval_sets``.

    Raises:
        ConfigError: Unknown ``precision``.
        DataError: A set has no readable image, or too many unreadable ones.
        ModelError: The classifier's head does not fit a set's class list.
    """
    _autocast(precision, torch.device(dist_env.device))  # fail before reading any data
    check_ece_bins(ece_bins)
    was_training = classifier.training
    classifier.eval()
    try:
        with torch.inference_mode():
            return [
                evaluate_set(
                    classifier, eval_set, dist_env=dist_env, batch_size=batch_size,
                    workers=workers, precision=precision, progress=progress,
                    max_bad_fraction=max_bad_fraction, bad_images_file=bad_images_file,
                    bad_fraction_setting=bad_fraction_setting, ece_bins=ece_bins,
                )
                for eval_set in eval_sets
            ]
    finally:
        classifier.train(was_training)


def ood_average(
    results: Sequence[EvalResult],
    id_name: str = "imagenet",
    shift_names: Sequence[str] | None = None,
) -> float:
    """Mean top-1 (percent) over the distribution-shift sets.

    Args:
        results: Results of one classifier.
        id_name: The in-distribution set, left out of the average.
        shift_names: The shift sets to average (all must be present); None means every
            set in ``results`` other than ``id_name``.

    Raises:
        DataError: A requested shift set is missing, or there is no shift set at all.
    """
    by_name = {r.dataset: r for r in results}
    if shift_names is None:
        shift_names = [name for name in by_name if name != id_name]
    missing = [name for name in shift_names if name not in by_name]
    if missing:
        raise DataError(f"no result for shift set(s) {missing}; results cover {sorted(by_name)}")
    if not shift_names:
        raise DataError(f"no distribution-shift result to average (only {sorted(by_name)})")
    return math.fsum(by_name[name].top1 for name in shift_names) / len(shift_names)
