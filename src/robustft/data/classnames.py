"""ImageNet class tables: WNIDs, prompt names, WordNet lemmas and the 200-class subsets.

The tables are package data files in ``robustft/data/_info/`` (generated once by
``tools/make_info_files.py`` from timm's and open_clip's published lists) and are read with
:mod:`importlib.resources`, so they work from a wheel, a zip or an editable install.

ObjectNet's mapping to ImageNet classes is not shipped here: it is read from the files the
ObjectNet release itself ships in ``objectnet-1.0/mappings/`` (:func:`read_objectnet_mapping`).

Index conventions: "head index" ``i`` is the ``i``-th ImageNet class in sorted-WNID order
(``n01440764`` is 0), the order of torchvision's ``ImageFolder`` on ``train/`` and of every
open_clip zero-shot ImageNet head.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from robustft.errors import DataError

__all__ = [
    "read_info_lines",
    "imagenet_wnids",
    "imagenet_classnames",
    "imagenet_lemmas",
    "imagenet_wnid_to_index",
    "imagenet_r_wnids",
    "imagenet_a_wnids",
    "imagenet_r_indices",
    "imagenet_a_indices",
    "OBJECTNET_MAPPING_FILES",
    "OBJECTNET_MAPPED_CLASSES",
    "ObjectNetMapping",
    "read_objectnet_mapping",
]

logger = logging.getLogger(__name__)


@cache
def read_info_lines(name: str) -> tuple[str, ...]:
    """Return the non-empty lines of the package data file ``_info/<name>``."""
    path = resources.files("robustft.data").joinpath("_info", name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"package data file _info/{name} is missing; reinstall robustft") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _checked(name: str, expected: int) -> tuple[str, ...]:
    lines = read_info_lines(name)
    if len(lines) != expected:
        raise DataError(f"package data file _info/{name} has {len(lines)} lines, expected {expected}; reinstall")
    return lines


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WNIDs in head-index (sorted) order."""
    return _checked("imagenet_wnids.txt", 1000)


def imagenet_classnames() -> tuple[str, ...]:
    """The 1000 prompt-friendly class names (open_clip's list), in head-index order."""
    return _checked("imagenet_classnames.txt", 1000)


def imagenet_lemmas() -> tuple[str, ...]:
    """The 1000 WordNet lemma strings (``"tench, Tinca tinca"``), in head-index order.

    These are the names ObjectNet's ``imagenet_to_label_2012_v2`` file uses.
    """
    return _checked("imagenet_lemmas.txt", 1000)


@cache
def imagenet_wnid_to_index() -> dict[str, int]:
    """Map each ImageNet WNID to its head index."""
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


def imagenet_r_wnids() -> tuple[str, ...]:
    """The 200 ImageNet-R WNIDs, sorted (so also in head-index order)."""
    return _checked("imagenet_r_wnids.txt", 200)


def imagenet_a_wnids() -> tuple[str, ...]:
    """The 200 ImageNet-A WNIDs, sorted (so also in head-index order)."""
    return _checked("imagenet_a_wnids.txt", 200)


@cache
def _subset_indices(name: str) -> tuple[int, ...]:
    index = imagenet_wnid_to_index()
    wnids = _checked(name, 200)
    unknown = [w for w in wnids if w not in index]
    if unknown:
        raise DataError(f"_info/{name} lists WNIDs outside ImageNet-1k: {unknown[:5]}; reinstall robustft")
    return tuple(sorted(index[w] for w in wnids))


def imagenet_r_indices() -> tuple[int, ...]:
    """Head indices of the 200 ImageNet-R classes, ascending."""
    return _subset_indices("imagenet_r_wnids.txt")


def imagenet_a_indices() -> tuple[int, ...]:
    """Head indices of the 200 ImageNet-A classes, ascending."""
    return _subset_indices("imagenet_a_wnids.txt")


# The four files of ``objectnet-1.0/mappings/`` in the official release:
#   folder_to_objectnet_label.json   {"alarm_clock": "Alarm clock", ...}          313 folders
#   objectnet_to_imagenet_1k.json    {"Alarm clock": "analog clock; digital clock", ...}  113
#   pytorch_to_imagenet_2012_id.json {"<head index>": <line of the label file>, ...}    1000
#   imagenet_to_label_2012_v2        one ImageNet lemma string per line                1000
OBJECTNET_MAPPING_FILES = (
    "folder_to_objectnet_label.json",
    "objectnet_to_imagenet_1k.json",
    "pytorch_to_imagenet_2012_id.json",
    "imagenet_to_label_2012_v2",
)
OBJECTNET_MAPPED_CLASSES = 113


@dataclass(frozen=True)
class ObjectNetMapping:
    """ObjectNet's class folders and their ImageNet classes, as the release defines them.

    Attributes:
        folder_to_label: Every ObjectNet class folder -> its ObjectNet class name.
        mapped: Folder -> ascending head indices of its ImageNet classes, for the classes
            that map to ImageNet only (113 in the official release; some map to several).
    """

    folder_to_label: dict[str, str]
    mapped: dict[str, tuple[int, ...]]


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"objectnet: cannot read {path} ({exc}); expected {what}") from None
    if not isinstance(data, dict):
        raise DataError(f"objectnet: {path} holds a {type(data).__name__}, expected a JSON object of {what}")
    return data


def _head_of_line(path: Path) -> dict[int, int]:
    """Invert pytorch_to_imagenet_2012_id.json: label-file line -> head index."""
    raw = _load_json(path, '{"<head index>": <label-file line>} for 1000 classes')
    try:
        pairs = {int(line): int(head) for head, line in raw.items()}
    except (TypeError, ValueError):
        raise DataError(f"objectnet: {path} must map integer head indices to integer lines") from None
    if len(raw) != 1000 or sorted(pairs) != list(range(1000)) or sorted(pairs.values()) != list(range(1000)):
        raise DataError(f"objectnet: {path} must map each of the 1000 head indices to a distinct line")
    return pairs


def _lines_of_name(path: Path) -> dict[str, list[int]]:
    """Map each ImageNet lemma string of ``imagenet_to_label_2012_v2`` to its line(s)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"objectnet: cannot read {path} ({exc})") from None
    lines = [line.strip() for line in lines]
    if len(lines) != 1000:
        raise DataError(f"objectnet: {path} has {len(lines)} lines, expected one ImageNet label per line (1000)")
    found: dict[str, list[int]] = {}
    for i, name in enumerate(lines):
        found.setdefault(name, []).append(i)  # "crane" names two classes (bird, machine)
    return found


def read_objectnet_mapping(mappings_dir: str | os.PathLike[str]) -> ObjectNetMapping:
    """Read ObjectNet's ``mappings/`` folder into folder -> head-class indices.

    Raises:
        DataError: A file is missing or malformed, or a name does not resolve.
    """
    folder = Path(mappings_dir)
    missing = [name for name in OBJECTNET_MAPPING_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"objectnet: expected the release's mapping files {', '.join(missing)} at {folder}, found "
            f"{sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no such folder'}"
        )
    folder_to_label = _load_json(folder / OBJECTNET_MAPPING_FILES[0], '{"<folder>": "<ObjectNet class>"}')
    to_imagenet = _load_json(folder / OBJECTNET_MAPPING_FILES[1], '{"<ObjectNet class>": "<label>; <label>"}')
    head_of_line = _head_of_line(folder / OBJECTNET_MAPPING_FILES[2])
    lines_of = _lines_of_name(folder / OBJECTNET_MAPPING_FILES[3])
    folder_of = {str(label): str(name) for name, label in folder_to_label.items()}
    mapped: dict[str, tuple[int, ...]] = {}
    for label, names in to_imagenet.items():
        if label not in folder_of or not isinstance(names, str):
            raise DataError(f"objectnet: class {label!r} of {OBJECTNET_MAPPING_FILES[1]} has no folder in "
                            f"{OBJECTNET_MAPPING_FILES[0]} (or its value is not a string)")
        heads: set[int] = set()
        for name in (n.strip() for n in names.split(";")):
            if name not in lines_of:
                raise DataError(f"objectnet: ImageNet label {name!r} (for {label!r}) is not a line of "
                                f"{OBJECTNET_MAPPING_FILES[3]}")
            if len(lines_of[name]) > 1:
                logger.warning("objectnet: ImageNet label %r names %d classes; all count", name, len(lines_of[name]))
            heads.update(head_of_line[line] for line in lines_of[name])
        mapped[folder_of[label]] = tuple(sorted(heads))
    return ObjectNetMapping({str(k): str(v) for k, v in folder_to_label.items()}, mapped)
