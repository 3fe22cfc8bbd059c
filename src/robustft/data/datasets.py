"""Evaluation sets (ImageNet and its five shifts, user folders) and training folders.

An :class:`EvalSet` bundles a dataset with its scoring protocol: which head classes count
as correct for each dataset label (``label_sets``; several for ObjectNet) and which head
classes the prediction may choose from (``class_indices``; the 200-class subset for
ImageNet-R/-A, the mapped classes for ObjectNet). The official releases are registered in
:data:`EVAL_DATASETS` and found under ``--data-root`` where their archives extract to (see
:mod:`robustft.data.layouts`); any class-per-folder test set of the user's is built with
:func:`build_folder_eval_set`, without code.

For the ImageNet family the model's head is the 1000 ImageNet classes in sorted-WNID order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from robustft.data.classnames import (
    OBJECTNET_MAPPED_CLASSES,
    imagenet_a_indices,
    imagenet_a_wnids,
    imagenet_classnames,
    imagenet_r_indices,
    imagenet_r_wnids,
    imagenet_wnids,
    read_objectnet_mapping,
)
from robustft.data.folder import ImageFolderDataset, IndexedSubset, list_class_dirs
from robustft.data.layouts import LAYOUTS, find_dataset_dir, resolve_class_root, validate_class_folders
from robustft.data.splits import stratified_holdout
from robustft.data.transforms import build_transform
from robustft.errors import DataError, choices_hint
from robustft.registry import Registry

__all__ = [
    "EvalSet",
    "Grouping",
    "METRICS",
    "EVAL_DATASETS",
    "IMAGENET_HOLDOUT",
    "build_eval_set",
    "build_folder_eval_set",
    "build_folder_train_set",
    "ImageNetTrain",
    "build_imagenet_train",
    "read_class_file",
]

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
IMAGENET_HOLDOUT = 10_240
"""Training images the ImageNet recipe holds out (stratified) for model selection."""


METRICS = ("top1", "top5", "macro_f1", "worst_region", "worst_year", "ece", "nll")
"""Every metric an evaluation can report (see :mod:`robustft.evaluation.metrics`)."""


@dataclass(frozen=True)
class Grouping:
    """A partition of an evaluation set's images (FMoW's regions or years) for worst-group metrics.

    Attributes:
        kind: What the groups are (``"region"``, ``"year"``); the metric ``worst_<kind>`` is
            the lowest top-1 accuracy over the groups.
        names: The group names, in group-id order.
        ids: The group id of each image of the set, by its position (-1: in no group).
        excluded: Group names left out of the worst-group minimum (FMoW's ``"Other"`` region);
            their accuracy is still reported.
    """

    kind: str
    names: list[str]
    ids: list[int]
    excluded: tuple[str, ...] = ()


@dataclass
class EvalSet:
    """A dataset and how to score it.

    Attributes:
        name: Dataset name used in results (``imagenet-r``, or a user folder's name).
        dataset: Yields ``(image [3, H, W] in [0, 1], label, index)`` (or None for an
            unreadable file); ``label`` indexes ``label_sets``.
        label_sets: For each dataset label, the head-class indices counted correct.
        class_indices: Head classes the argmax may choose from (ascending), or None for all.
        protocol: Short description of the scoring, e.g. ``"200-class subset"``.
        num_classes: Number of head classes the indices refer to (the head's size).
        label_names: A readable name per dataset label (WNID, folder or class name).
        metrics: The metrics the set's protocol reports beyond top-1/top-5 and calibration
            (``"macro_f1"``, ``"worst_region"``, ``"worst_year"``; names from :data:`METRICS`).
        headline: The metric the literature reports for this set (``"top1"``, ``"macro_f1"``,
            ``"worst_region"``); tables and OOD averages use it.
        groups: Partitions of the images for ``worst_<kind>`` metrics, by kind.
    """

    name: str
    dataset: Dataset
    label_sets: list[list[int]]
    class_indices: list[int] | None
    protocol: str
    num_classes: int
    label_names: list[str] = field(default_factory=list)
    metrics: tuple[str, ...] = ()
    headline: str = "top1"
    groups: dict[str, Grouping] = field(default_factory=dict)


EvalBuilder = Callable[[Path | None, Path | None, Transform], EvalSet]
EVAL_DATASETS: Registry[EvalBuilder] = Registry("evaluation dataset", DataError)


def _warn_if_partial(name: str, root: Path, present: int, expected: int, images: int, official: int) -> None:
    """Partial trees are allowed (users evaluate subsets) but never silently."""
    if present < expected or images < official:
        logger.warning(
            "%s: found %d of %d class folders and %d of %d images at %s; evaluating what is there "
            "(accuracy is not comparable to the official full set)", name, present, expected, images, official, root,
        )


def _folder_set(name: str, data_root: Path | None, override: Path | None, transform: Transform,
                folders: Sequence[str], label_sets: list[list[int]], class_indices: list[int] | None,
                protocol: str) -> EvalSet:
    """An EvalSet whose class folders ``folders[i]`` carry label ``i``."""
    layout = LAYOUTS.get(name)
    root = resolve_class_root(layout, data_root, override)
    present = validate_class_folders(name, root, folders, layout.description)
    dataset = ImageFolderDataset(root, folders, transform, allow_missing=True)
    _warn_if_partial(name, root, len(present), len(folders), len(dataset), layout.expected_images)
    return EvalSet(name, dataset, label_sets, class_indices, protocol, 1000, list(folders))


def _all_classes(name: str, folders: Callable[[], Sequence[str]], protocol: str) -> EvalBuilder:
    def build(data_root: Path | None, override: Path | None, transform: Transform) -> EvalSet:
        labels = [[i] for i in range(1000)]
        return _folder_set(name, data_root, override, transform, folders(), labels, None, protocol)

    return build


def _subset(name: str, wnids: Callable[[], Sequence[str]], indices: Callable[[], Sequence[int]]) -> EvalBuilder:
    def build(data_root: Path | None, override: Path | None, transform: Transform) -> EvalSet:
        heads = list(indices())  # ascending, and the WNID lists are sorted: label i <-> heads[i]
        labels = [[h] for h in heads]
        return _folder_set(name, data_root, override, transform, wnids(), labels, heads, "200-class subset")

    return build


def _objectnet(data_root: Path | None, override: Path | None, transform: Transform) -> EvalSet:
    layout = LAYOUTS.get("objectnet")
    root = resolve_class_root(layout, data_root, override)
    mapping = read_objectnet_mapping(root.parent / "mappings")
    validate_class_folders("objectnet", root, sorted(mapping.folder_to_label), layout.description)
    folders = sorted(mapping.mapped)
    if not folders:
        raise DataError(f"objectnet: {root.parent / 'mappings'} maps no ObjectNet class to ImageNet classes")
    present = [f for f in folders if (root / f).is_dir()]
    if not present:
        raise DataError(f"objectnet: expected the {len(folders)} mapped class folders (e.g. {folders[0]}) at {root}, "
                        "found none of them")
    # The red border is cropped before the transform, as the release's authors prescribe.
    dataset = ImageFolderDataset(root, folders, transform, allow_missing=True, crop_border=2)
    # The official image count only applies to the official 113-class mapping.
    official = layout.expected_images if len(folders) == OBJECTNET_MAPPED_CLASSES else 0
    _warn_if_partial("objectnet", root, len(present), len(folders), len(dataset), official)
    label_sets = [list(mapping.mapped[f]) for f in folders]
    union = sorted({h for heads in label_sets for h in heads})
    protocol = f"{len(folders)} mapped classes, multi-label"
    names = [mapping.folder_to_label[f] for f in folders]
    return EvalSet("objectnet", dataset, label_sets, union, protocol, 1000, names)


def _v2_folders() -> list[str]:
    return [str(i) for i in range(1000)]  # folder "10" is class 10: never sort these as strings


EVAL_DATASETS.add("imagenet", _all_classes("imagenet", imagenet_wnids, "1000 classes"))
EVAL_DATASETS.add("imagenet-v2", _all_classes("imagenet-v2", _v2_folders, "1000 classes (folder name = class index)"))
EVAL_DATASETS.add("imagenet-r", _subset("imagenet-r", imagenet_r_wnids, imagenet_r_indices))
EVAL_DATASETS.add("imagenet-sketch", _all_classes("imagenet-sketch", imagenet_wnids, "1000 classes"))
EVAL_DATASETS.add("imagenet-a", _subset("imagenet-a", imagenet_a_wnids, imagenet_a_indices))
EVAL_DATASETS.add("objectnet", _objectnet)


def _path(value: str | os.PathLike[str] | None) -> Path | None:
    return Path(value).expanduser() if value is not None else None


def build_eval_set(
    name: str,
    data_root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    path_override: str | os.PathLike[str] | None = None,
    head_classnames: Sequence[str] | None = None,
    transform: Transform | None = None,
) -> EvalSet:
    """Build a registered evaluation set from its official on-disk release.

    Args:
        name: One of ``EVAL_DATASETS.names()``.
        data_root: Folder holding each release where its archive extracts to.
        image_size: Model input size; used for the default eval transform.
        path_override: This dataset's own folder, replacing the lookup under ``data_root``.
        head_classnames: The model head's classes, to check it is a 1000-class ImageNet head.
        transform: PIL -> tensor transform replacing the default CLIP eval transform.

    Raises:
        DataError: Unknown name, missing or malformed tree, or a head that is not ImageNet's.
    """
    builder = EVAL_DATASETS.get(name)
    if head_classnames is not None and len(head_classnames) != 1000:
        raise DataError(
            f"{name} is scored with the 1000 ImageNet classes in WNID order, but the model's head has "
            f"{len(head_classnames)} classes; use a head built from the ImageNet class names"
        )
    tf = transform if transform is not None else build_transform(image_size)
    return builder(_path(data_root), _path(path_override), tf)


def read_class_file(path: str | os.PathLike[str]) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file (one class per line)."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class file {file} ({exc}); expected one class per line (UTF-8)") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"class file {file} is empty; expected one class per line")
    return names


def _folder_classes(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise DataError(
            f"{what}: expected an image folder with one sub-folder per class at {root}, found no such folder"
        )
    classes = list_class_dirs(root)
    if not classes:
        raise DataError(f"{what}: expected one sub-folder per class at {root}, found no folders")
    return classes


def build_folder_eval_set(
    name: str,
    root: str | os.PathLike[str],
    *,
    train_classes: Sequence[str],
    image_size: int,
    classes_file: str | os.PathLike[str] | None = None,
    transform: Transform | None = None,
) -> EvalSet:
    """A user's class-per-folder test set scored against the training classes.

    Its class folders must be the training class folders or a subset of them; with a subset,
    the argmax is restricted to it (like ImageNet-R).

    Args:
        name: Name of the set in results.
        root: Folder with one sub-folder per class.
        train_classes: The training class folder names, in head order.
        image_size: Model input size for the default eval transform.
        classes_file: Optional file listing the class folders to evaluate (one per line);
            default: every sub-folder of ``root``.
        transform: Replaces the default eval transform.
    """
    folder = Path(root).expanduser()
    found = _folder_classes(folder, name)
    classes = read_class_file(classes_file) if classes_file is not None else found
    head_of = {c: i for i, c in enumerate(train_classes)}
    for c in classes:
        if c not in head_of:
            raise DataError(f"{name}: class folder {c!r} at {folder} is not a training class; "
                            f"{choices_hint(c, train_classes)}")
        if c not in found:
            raise DataError(f"{name}: class {c!r} from {classes_file} has no folder at {folder / c}")
    ordered = sorted(set(classes), key=head_of.__getitem__)
    dataset = ImageFolderDataset(folder, ordered, transform or build_transform(image_size))
    if len(dataset) == 0:
        raise DataError(f"{name}: expected images in the class folders at {folder}, found none")
    heads = [head_of[c] for c in ordered]
    subset = len(heads) < len(train_classes)
    protocol = f"{len(heads)}-of-{len(train_classes)} class subset" if subset else f"all {len(heads)} classes"
    label_sets = [[h] for h in heads]
    return EvalSet(name, dataset, label_sets, heads if subset else None, protocol, len(train_classes), ordered)


def build_folder_train_set(
    root: str | os.PathLike[str],
    *,
    image_size: int,
    classnames_file: str | os.PathLike[str] | None = None,
    train_augment: bool = False,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
    transform: Transform | None = None,
) -> tuple[ImageFolderDataset, list[str]]:
    """A user's class-per-folder training set and its class names for prompts.

    Labels follow the sorted class folder names. Class names come from the folder names
    (underscores become spaces) or from ``classnames_file``: one name per line, in the same
    order as the sorted folders. ``train_augment``, ``crop_scale`` and ``flip`` shape the
    training transform (:func:`~robustft.data.transforms.build_transform`) unless
    ``transform`` is given.

    Returns:
        The dataset (its ``classes`` are the folder names) and the class names.
    """
    folder = Path(root).expanduser()
    classes = _folder_classes(folder, "training set")
    if classnames_file is not None:
        names = read_class_file(classnames_file)
        if len(names) != len(classes):
            raise DataError(
                f"class-names file {classnames_file} has {len(names)} names but {folder} has {len(classes)} class "
                f"folders ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}); give one name per folder, "
                "in sorted folder order"
            )
    else:
        names = [c.replace("_", " ") for c in classes]
    tf = transform or build_transform(image_size, train_augment=train_augment, crop_scale=crop_scale, flip=flip)
    dataset = ImageFolderDataset(folder, classes, tf)
    if len(dataset) == 0:
        raise DataError(f"training set: expected images in the class folders at {folder}, found none")
    return dataset, names


@dataclass
class ImageNetTrain:
    """ImageNet's training folder split into training images and a held-out EvalSet."""

    train: IndexedSubset
    holdout: EvalSet
    classnames: list[str]


def build_imagenet_train(
    data_root: str | os.PathLike[str] | None,
    *,
    image_size: int,
    n_holdout: int = IMAGENET_HOLDOUT,
    seed: int = 0,
    path_override: str | os.PathLike[str] | None = None,
    train_augment: bool = False,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> ImageNetTrain:
    """ImageNet ``train/`` minus a stratified held-out split (10,240 images by default).

    The training images use :func:`~robustft.data.transforms.build_transform` with
    ``train_augment``, ``crop_scale`` and ``flip``; the held-out images use the eval
    transform and are scored on all 1000 classes.
    """
    layout = LAYOUTS.get("imagenet")
    base = find_dataset_dir(layout, _path(data_root), _path(path_override))
    train_dir = base / "train" if base is not None else None
    if train_dir is None or not train_dir.is_dir():
        where = train_dir or (_path(data_root) or Path(".")) / "imagenet" / "train"
        raise DataError(f"imagenet: expected train/ with 1000 WNID class folders at {where}, found no such folder")
    wnids = list(imagenet_wnids())
    validate_class_folders("imagenet", train_dir, wnids, "train/ with 1000 WNID class folders")
    train_tf = build_transform(image_size, train_augment=train_augment, crop_scale=crop_scale, flip=flip)
    full = ImageFolderDataset(train_dir, wnids, train_tf, allow_missing=True)
    train_idx, hold_idx = stratified_holdout(full.targets(), n_holdout, seed)
    holdout = IndexedSubset(full.with_transform(build_transform(image_size)), hold_idx)
    eval_set = EvalSet("imagenet-holdout", holdout, [[i] for i in range(1000)], None, "1000 classes", 1000, wnids)
    return ImageNetTrain(IndexedSubset(full, train_idx), eval_set, list(imagenet_classnames()))
