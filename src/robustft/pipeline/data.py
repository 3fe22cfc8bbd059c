"""Build a run's datasets from its config: training images, held-out split, test sets.

Three kinds of training data (``data.train``):

- ``imagenet``: the official release under ``data.root`` (10,240 held-out images);
- ``folder``: the user's class-per-folder images at ``data.train_dir`` (+ ``data.val_dir``
  as the in-distribution test set ``id`` and any ``data.ood_folders``), no code needed;
- ``synthetic``: the demo's synthetic world (generated once, cached), whose splits are
  ImageFolder trees evaluated exactly like a user's folders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from robustft.config import DataConfig, RunConfig
from robustft.data.datasets import (
    EVAL_DATASETS,
    IMAGENET_HOLDOUT,
    EvalSet,
    build_eval_set,
    build_folder_eval_set,
    build_folder_train_set,
    build_imagenet_train,
)
from robustft.data.folder import IndexedSubset
from robustft.data.splits import stratified_holdout
from robustft.data.suites import SUITES
from robustft.data.synthetic import SHIFTS, WorldConfig, WorldPaths, write_world
from robustft.data.transforms import build_transform
from robustft.errors import ConfigError, DataError, choices_hint
from robustft.model.prompts import load_classnames

__all__ = ["RunData", "build_run_data", "build_test_sets", "world_paths", "IMAGENET_SUITE"]

logger = logging.getLogger(__name__)

IMAGENET_SUITE = SUITES.get("imagenet-shifts").sets
"""ImageNet (ID) and its five shifts, in the paper's column order."""

TRAIN_KINDS = ("imagenet", "folder", "synthetic")


@dataclass
class RunData:
    """Everything data-related a training run needs.

    Attributes:
        train: Yields ``(image [3, H, W] in [0, 1], label, index)``; index = position.
        holdout: Held-out training images that choose the best epoch (None: no selection).
        classnames: Class names of the head, in label order (for prompts).
        templates: The template spec ("auto" resolved): a set name or a file path.
        test_names: Names of the test sets evaluated after training.
        folder_classes: Class folder names (folder/synthetic data), in label order.
        identity: A short description of the training data (for caches and logs).
    """

    train: Dataset
    holdout: EvalSet | None
    classnames: list[str]
    templates: str
    test_names: list[str]
    folder_classes: list[str] = field(default_factory=list)
    identity: str = ""
    folders: dict[str, str] = field(default_factory=dict)  # test set name -> folder (folder/synthetic)


def world_paths(world: WorldConfig | None = None) -> WorldPaths:
    """The demo world on disk (written once into the cache)."""
    return write_world(world or WorldConfig())


def _resolve_holdout(requested: int, n_train: int, default: int) -> int:
    n = default if requested == -1 else requested
    if n >= n_train:
        raise ConfigError(f"data.holdout = {n} leaves no training images (the training set has {n_train}); "
                          "use a smaller data.holdout, or 0 to keep the last epoch")
    return n


def _split_holdout(dataset: Dataset, n_holdout: int, seed: int, image_size: int, limit: int,
                   classes: list[str]) -> tuple[Dataset, EvalSet | None]:
    """Limit to the first ``limit`` images (0: all), then hold ``n_holdout`` out, stratified."""
    positions = list(range(len(dataset)))  # type: ignore[arg-type]
    if limit and limit < len(positions):
        positions = positions[:limit]
    targets = dataset.targets()  # type: ignore[attr-defined]
    if n_holdout == 0:
        return IndexedSubset(dataset, positions), None
    train_idx, hold_idx = stratified_holdout([targets[p] for p in positions], n_holdout, seed)
    eval_view = dataset.with_transform(build_transform(image_size))  # type: ignore[attr-defined]
    holdout = EvalSet("holdout", IndexedSubset(eval_view, [positions[i] for i in hold_idx]),
                      [[i] for i in range(len(classes))], None, f"all {len(classes)} classes", len(classes),
                      list(classes))
    return IndexedSubset(dataset, [positions[i] for i in train_idx]), holdout


def _limit(dataset: Dataset, limit: int) -> Dataset:
    if limit and limit < len(dataset):  # type: ignore[arg-type]
        return IndexedSubset(dataset, list(range(limit)))
    return dataset


def _folder_tests(cfg: RunConfig, val_dir: str | None, ood: dict[str, str]) -> dict[str, str]:
    folders = {"id": val_dir} if val_dir else {}
    for name, path in ood.items():
        if name in folders or name in EVAL_DATASETS:
            raise ConfigError(f"data.ood_folders: the name {name!r} is taken; pick another name for {path}")
        folders[name] = path
    return folders  # type: ignore[return-value]


def _test_names(cfg: RunConfig, available: list[str], default: list[str]) -> list[str]:
    names = default if cfg.data.eval_sets == ["auto"] else list(cfg.data.eval_sets)
    for name in names:
        if name not in available:
            raise ConfigError(f"data.eval_sets: unknown test set {name!r}; {choices_hint(name, available)}")
    return names


def build_run_data(cfg: RunConfig, image_size: int) -> RunData:
    """Build (and check) the training data and the test-set plan of ``cfg``.

    Every path is checked here, before any model is loaded or folder written.
    """
    kind = cfg.data.train
    if kind not in TRAIN_KINDS:
        raise ConfigError(f"data.train: unknown kind {kind!r}; {choices_hint(kind, TRAIN_KINDS)}")
    augment = _augment(cfg)
    if kind == "imagenet":
        n_hold = IMAGENET_HOLDOUT if cfg.data.holdout == -1 else cfg.data.holdout
        # holdout 0 (keep the last epoch) still splits off one image, which is then unused.
        inet = build_imagenet_train(cfg.data.root, image_size=image_size, n_holdout=max(n_hold, 1),
                                    seed=cfg.seed, path_override=cfg.data.paths.get("imagenet"), **augment)
        holdout = inet.holdout if n_hold > 0 else None
        tests = _test_names(cfg, list(EVAL_DATASETS.names()), list(IMAGENET_SUITE))
        return RunData(_limit(inet.train, cfg.data.limit_train), holdout, _classnames(cfg, inet.classnames),
                       _templates(cfg, "openai_imagenet"), tests, identity=f"imagenet:{cfg.data.root}")
    if kind == "synthetic":
        paths = world_paths()
        train_dir, folders = str(paths.splits["train"]), {"id": str(paths.splits["id"])}
        folders.update({s: str(paths.splits[s]) for s in SHIFTS})
        folders.update(_folder_tests(cfg, None, cfg.data.ood_folders))
        # Class folders are the colour names; labels follow their sorted order, so the class
        # names for prompts come from the folders too (classnames.txt is in world order).
        classes_file, default_templates = None, str(paths.templates)
    else:
        if not cfg.data.train_dir:
            raise ConfigError("data.train = folder needs data.train_dir (an ImageFolder: one sub-folder per class)")
        train_dir, folders = cfg.data.train_dir, _folder_tests(cfg, cfg.data.val_dir, cfg.data.ood_folders)
        classes_file, default_templates = None, "openai_imagenet"
    dataset, names = build_folder_train_set(train_dir, image_size=image_size, classnames_file=classes_file,
                                            **augment)
    n_train = min(len(dataset), cfg.data.limit_train or len(dataset))
    n_hold = _resolve_holdout(cfg.data.holdout, n_train, max(1, n_train // 20))
    folder_classes = list(dataset.classes)
    train, holdout = _split_holdout(dataset, n_hold, cfg.seed, image_size, cfg.data.limit_train, folder_classes)
    tests = _test_names(cfg, list(folders), list(folders))
    for name in tests:  # fail now, not after training, when a test folder is wrong
        build_folder_eval_set(name, folders[name], train_classes=folder_classes, image_size=image_size)
    return RunData(train, holdout, _classnames(cfg, names), _templates(cfg, default_templates), tests,
                   folder_classes=folder_classes, identity=f"{kind}:{Path(train_dir).resolve()}", folders=folders)


def _augment(cfg: RunConfig) -> dict[str, Any]:
    """The training transform's augmentation arguments (``build_transform``'s) from ``cfg.data``."""
    d, default = cfg.data, DataConfig()
    low, high = d.augment_crop_scale
    if not d.train_augment and ([low, high] != default.augment_crop_scale or d.augment_flip != default.augment_flip):
        logger.warning("data.augment_crop_scale and data.augment_flip shape data.train_augment's crop and flip; "
                       "train_augment is false, so they are ignored")
    return {"train_augment": d.train_augment, "crop_scale": (low, high), "flip": d.augment_flip}


def _classnames(cfg: RunConfig, default: list[str]) -> list[str]:
    spec = cfg.head.classnames
    if spec == "auto":
        return default
    names = load_classnames(spec)
    if len(names) != len(default):
        raise ConfigError(f"head.classnames {spec!r} lists {len(names)} classes but the training data has "
                          f"{len(default)}; give one name per class, in label order (or 'auto')")
    return names


def _templates(cfg: RunConfig, default: str) -> str:
    return default if cfg.head.templates == "auto" else cfg.head.templates


def build_test_sets(cfg: RunConfig, data: RunData, image_size: int, classnames: list[str]) -> list[EvalSet]:
    """The test sets named in ``data.test_names``, built for a head with ``classnames``."""
    sets = []
    for name in data.test_names:
        if name in data.folders:
            sets.append(build_folder_eval_set(name, data.folders[name], train_classes=data.folder_classes,
                                              image_size=image_size))
        else:
            sets.append(build_eval_set(name, cfg.data.root, image_size=image_size,
                                       path_override=cfg.data.paths.get(name), head_classnames=classnames))
    return sets


def check_data_root(root: str) -> None:
    """A clear error when the data root is missing (used before long work)."""
    if not Path(root).is_dir():
        raise DataError(f"data root {root!r} does not exist; point data.root (or --data-root) at the folder "
                        "holding the dataset releases (see the README, 'Datasets')")
