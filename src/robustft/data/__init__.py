"""The data layer: class tables, transforms, image folders, evaluation sets and loaders.

- :mod:`~robustft.data.classnames`: ImageNet WNIDs, names, R/A subsets, ObjectNet mapping.
- :mod:`~robustft.data.transforms`: PIL -> ``[3, H, W]`` float tensors in ``[0, 1]``.
- :mod:`~robustft.data.folder`: class-per-folder datasets that skip unreadable images.
- :mod:`~robustft.data.datasets`: ImageNet and its shifts (registered by name), user folders.
- :mod:`~robustft.data.layouts`: where each release lives on disk, and layout checks.
- :mod:`~robustft.data.splits`: stratified held-out splits.
- :mod:`~robustft.data.loaders`: train and (unpadded, sharded) eval DataLoaders.
- :mod:`~robustft.data.testing`: tiny fake trees in each official layout, for tests.
"""

from robustft.data.classnames import (
    imagenet_a_indices,
    imagenet_classnames,
    imagenet_r_indices,
    imagenet_wnids,
)
from robustft.data.datasets import (
    EVAL_DATASETS,
    IMAGENET_HOLDOUT,
    EvalSet,
    build_eval_set,
    build_folder_eval_set,
    build_folder_train_set,
    build_imagenet_train,
)
from robustft.data.folder import BadImageTracker, ImageFolderDataset, check_bad_fraction, collate_skip_bad
from robustft.data.layouts import LayoutReport, check_layout, format_layout_table
from robustft.data.loaders import make_eval_loader, make_train_loader
from robustft.data.splits import stratified_holdout
from robustft.data.transforms import build_transform

__all__ = [
    "imagenet_wnids",
    "imagenet_classnames",
    "imagenet_r_indices",
    "imagenet_a_indices",
    "EVAL_DATASETS",
    "IMAGENET_HOLDOUT",
    "EvalSet",
    "build_eval_set",
    "build_folder_eval_set",
    "build_folder_train_set",
    "build_imagenet_train",
    "BadImageTracker",
    "ImageFolderDataset",
    "check_bad_fraction",
    "collate_skip_bad",
    "LayoutReport",
    "check_layout",
    "format_layout_table",
    "make_eval_loader",
    "make_train_loader",
    "stratified_holdout",
    "build_transform",
]
