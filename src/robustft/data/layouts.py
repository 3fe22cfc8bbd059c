"""Where each official evaluation release lives on disk, and checks that it is really there.

Every registered dataset has a :class:`DatasetLayout`: the folder its official archive
extracts to under ``--data-root``, the class folders it must contain and its official image
count. :func:`check_layout` inspects a tree without raising (for ``robustft datasets
check``); :func:`resolve_class_root` and :func:`validate_class_folders` raise
:class:`DataError` with "expected X at PATH, found Y" messages when a dataset is built.

Official image counts (the sizes reported by each release and used by the robustness
literature): ImageNet val 50,000 (ILSVRC2012); ImageNet-V2 matched-frequency 10,000 (Recht
et al. 2019, 10 per class); ImageNet-R 30,000 (Hendrycks et al. 2021); ImageNet-Sketch
50,889 (Wang et al. 2019: "~50 per class", 50,889 files in the archive); ImageNet-A 7,500
(Hendrycks et al. 2021); ObjectNet 1.0: 50,273 PNGs in 313 class folders, of which 18,574
fall in the 113 classes mapped to ImageNet (the count CLIP-style evaluations score).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from robustft.data.classnames import (
    OBJECTNET_MAPPED_CLASSES,
    imagenet_a_wnids,
    imagenet_r_wnids,
    imagenet_wnids,
    read_objectnet_mapping,
)
from robustft.data.folder import IMAGE_EXTENSIONS, list_class_dirs, list_images
from robustft.errors import DataError
from robustft.registry import Registry

__all__ = [
    "OBJECTNET_MAPPED_IMAGES",
    "DatasetLayout",
    "LAYOUTS",
    "LayoutReport",
    "find_dataset_dir",
    "resolve_class_root",
    "validate_class_folders",
    "check_layout",
    "format_layout_table",
    "describe_layouts",
    "RELEASE_CHECKS",
]

logger = logging.getLogger(__name__)

OBJECTNET_MAPPED_IMAGES = 18_574


@dataclass(frozen=True)
class DatasetLayout:
    """The on-disk shape of one official release.

    Attributes:
        name: Registered dataset name.
        folders: Folders (relative to the data root) the archive extracts to; the first is
            canonical, the others are accepted alternatives.
        class_subdir: Sub-folder of the dataset folder that holds the class folders
            (``"val"`` for ImageNet, ``"images"`` for ObjectNet, ``""`` otherwise).
        expected_classes: Returns the class folder names, or None when they come from the
            release itself (ObjectNet's mapping files).
        expected_images: Official number of evaluated images.
        description: What the class folders look like, for messages.
    """

    name: str
    folders: tuple[str, ...]
    class_subdir: str
    expected_classes: Callable[[], Sequence[str]] | None
    expected_images: int
    description: str


LAYOUTS: Registry[DatasetLayout] = Registry("dataset", DataError)


def _v2_folders() -> list[str]:
    return [str(i) for i in range(1000)]


for _layout in (
    DatasetLayout("imagenet", ("imagenet",), "val", imagenet_wnids, 50_000,
                  "val/ with 1000 WNID class folders (n01440764, ...)"),
    DatasetLayout("imagenet-v2", ("imagenetv2-matched-frequency-format-val", "imagenet-v2"), "", _v2_folders,
                  10_000, "1000 class folders named by class index 0..999"),
    DatasetLayout("imagenet-r", ("imagenet-r",), "", imagenet_r_wnids, 30_000,
                  "200 ImageNet-R WNID class folders (n01443537, ...)"),
    DatasetLayout("imagenet-sketch", ("sketch", "imagenet-sketch/sketch", "imagenet-sketch"), "", imagenet_wnids,
                  50_889, "1000 WNID class folders (n01440764, ...)"),
    DatasetLayout("imagenet-a", ("imagenet-a",), "", imagenet_a_wnids, 7_500,
                  "200 ImageNet-A WNID class folders (n01498041, ...)"),
    DatasetLayout("objectnet", ("objectnet-1.0",), "images", None, OBJECTNET_MAPPED_IMAGES,
                  "images/<class folder>/*.png (313 folders, the 113 mapped to ImageNet are scored) "
                  "and the release's mappings/ files"),
):
    LAYOUTS.add(_layout.name, _layout)


def find_dataset_dir(layout: DatasetLayout, data_root: Path | None, override: Path | None = None) -> Path | None:
    """The dataset folder if it exists (the override, else the first candidate found)."""
    if override is not None:
        return override if override.is_dir() else None
    if data_root is None:
        return None
    for rel in layout.folders:
        if (data_root / rel).is_dir():
            return data_root / rel
    return None


def _missing_message(layout: DatasetLayout, data_root: Path | None, override: Path | None) -> str:
    if override is not None:
        return f"{layout.name}: expected {layout.description} at {override} (path override), found no such folder"
    if data_root is None:
        return f"{layout.name}: no data root given; pass --data-root DIR (or a path override for {layout.name})"
    if not data_root.is_dir():
        return (f"{layout.name}: data root {data_root} does not exist or is not a folder; "
                f"pass the folder that holds {layout.folders[0]}/")
    where = " or ".join(str(data_root / rel) for rel in layout.folders)
    hint = _wrong_root_hint(layout, data_root)
    return f"{layout.name}: expected {layout.description} at {where}, found no such folder; {hint}"


def _wrong_root_hint(layout: DatasetLayout, data_root: Path) -> str:
    inside = list_class_dirs(data_root)
    if data_root.name in {Path(rel).name for rel in layout.folders} or (
        layout.expected_classes is not None and set(inside) & set(layout.expected_classes())
    ):
        return f"{data_root} looks like the {layout.name} folder itself: pass its parent as --data-root"
    shown = ", ".join(name + "/" for name in inside[:12]) + (" ..." if len(inside) > 12 else "")
    return f"{data_root} holds: {shown or 'no folders'} (or set a path override for {layout.name})"


def resolve_class_root(layout: DatasetLayout, data_root: str | os.PathLike[str] | None,
                       override: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds the class folders, or :class:`DataError` saying what is missing.

    An override may point at the dataset folder (``.../imagenet``) or directly at the class
    folders' parent (``.../imagenet/val``).
    """
    root = Path(data_root).expanduser() if data_root is not None else None
    over = Path(override).expanduser() if override is not None else None
    path = find_dataset_dir(layout, root, over)
    if path is None:
        raise DataError(_missing_message(layout, root, over))
    if not layout.class_subdir:
        return path
    sub = path / layout.class_subdir
    if sub.is_dir():
        return sub
    if over is not None and layout.expected_classes is not None and _has_expected(path, layout):
        return path  # the override already is the class-folder parent
    found = ", ".join(d + "/" for d in list_class_dirs(path)[:12]) or "no folders"
    raise DataError(f"{layout.name}: expected {layout.class_subdir}/ at {sub}, found {found} in {path}")


def _has_expected(path: Path, layout: DatasetLayout) -> bool:
    return bool(set(list_class_dirs(path)) & set(layout.expected_classes()))  # type: ignore[misc]


def validate_class_folders(name: str, class_root: Path, expected: Sequence[str], description: str) -> list[str]:
    """Check the class folders under ``class_root`` against ``expected``.

    Returns:
        The expected folders that are present, in the order of ``expected``.

    Raises:
        DataError: A folder that is not an expected class, or none of the expected ones.
    """
    found = list_class_dirs(class_root)
    valid = set(expected)
    foreign = [d for d in found if d not in valid]
    if foreign:
        shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 8 else "")
        raise DataError(
            f"{name}: expected {description} at {class_root}, found {len(foreign)} other folder(s): {shown}; "
            f"point {name} at the folder its official archive extracts to"
        )
    found_set = set(found)
    present = [c for c in expected if c in found_set]
    if not present:
        hint = ""
        if _holds_loose_images(class_root):
            hint = "; it holds images directly: sort them into one sub-folder per class (see the README)"
        raise DataError(f"{name}: expected {description} at {class_root}, found no class folders{hint}")
    return present


def _holds_loose_images(folder: Path) -> bool:
    """Whether ``folder`` has image files at its top level (an unsorted, flat release)."""
    with os.scandir(folder) as entries:
        return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)


@dataclass
class LayoutReport:
    """What :func:`check_layout` found for one dataset.

    Attributes:
        name: Registered dataset name.
        path: The class-folder parent that was inspected, or where it was expected.
        present: The dataset folder exists.
        complete: Every expected class folder exists, nothing foreign, and at least the
            official number of images.
        expected_classes / found_classes: Class folders expected and found.
        expected_images / found_images: Official image count and images found in the
            expected class folders.
        problems: Why the dataset is missing, unusable or incomplete.
        notes: Remarks that do not affect completeness.
    """

    name: str
    path: str
    present: bool
    complete: bool
    expected_classes: int
    found_classes: int
    expected_images: int
    found_images: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _expected_for(layout: DatasetLayout, class_root: Path) -> tuple[list[str], list[str]]:
    """(expected class folders, folders allowed on disk) for a present dataset."""
    if layout.expected_classes is not None:
        expected = list(layout.expected_classes())
        return expected, expected
    mapping = read_objectnet_mapping(class_root.parent / "mappings")
    return sorted(mapping.mapped), sorted(mapping.folder_to_label)


def check_layout(name: str, data_root: str | os.PathLike[str] | None,
                 path_override: str | os.PathLike[str] | None = None) -> LayoutReport:
    """Inspect one dataset's tree and report what is there; never raises for a bad tree.

    Raises:
        DataError: ``name`` is not a registered dataset.
    """
    layout = LAYOUTS.get(name)
    root = Path(data_root).expanduser() if data_root is not None else None
    guess = Path(path_override) if path_override is not None else (root / layout.folders[0] if root else Path("."))
    report = LayoutReport(name, str(guess), False, False, OBJECTNET_MAPPED_CLASSES, 0, layout.expected_images, 0)
    if layout.expected_classes is not None:
        report.expected_classes = len(layout.expected_classes())
    try:
        class_root = resolve_class_root(layout, root, path_override)
    except DataError as exc:
        report.present = find_dataset_dir(layout, root, Path(path_override) if path_override else None) is not None
        report.problems.append(str(exc))
        return report
    report.present, report.path = True, str(class_root)
    if name == "imagenet":
        _note_imagenet_train(report, class_root.parent)
    try:
        expected, allowed = _expected_for(layout, class_root)
        present = validate_class_folders(name, class_root, allowed, layout.description)
    except DataError as exc:
        report.problems.append(str(exc))
        return report
    _count(report, class_root, expected, present)
    return report


def _count(report: LayoutReport, class_root: Path, expected: list[str], present: list[str]) -> None:
    wanted = set(expected)
    counted = [c for c in present if c in wanted]
    report.expected_classes = len(expected)
    report.found_classes = len(counted)
    report.found_images = sum(len(list_images(class_root / c)) for c in counted)
    if report.name == "objectnet" and len(expected) != OBJECTNET_MAPPED_CLASSES:
        report.notes.append(
            f"mapping lists {len(expected)} mapped classes, the official release {OBJECTNET_MAPPED_CLASSES}"
        )
        report.expected_images = 0  # the official count does not apply to another mapping
    missing = [c for c in expected if c not in set(counted)]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        report.problems.append(
            f"expected {len(expected)} class folders at {class_root}, found {len(counted)}; missing {shown}"
        )
    empty = [c for c in counted if not any(os.scandir(class_root / c))]
    if empty:
        report.problems.append(f"{len(empty)} class folder(s) are empty, e.g. {empty[0]}")
    if report.expected_images and report.found_images < report.expected_images:
        report.problems.append(
            f"expected {report.expected_images} images, found {report.found_images} (incomplete download?)"
        )
    elif report.expected_images and report.found_images > report.expected_images:
        report.notes.append(f"{report.found_images - report.expected_images} more images than the official release")
    report.complete = not report.problems


def _note_imagenet_train(report: LayoutReport, dataset_dir: Path) -> None:
    train = dataset_dir / "train"
    if train.is_dir():
        report.notes.append(f"train/ found with {len(list_class_dirs(train))} class folders")
    else:
        report.notes.append(f"no train/ at {train} (needed only for fine-tuning on ImageNet)")


ReleaseCheck = Callable[[Path | None, Path | None], LayoutReport]
"""Inspects one release under a data root (or at its path override); never raises for a bad tree."""

RELEASE_CHECKS: Registry[ReleaseCheck] = Registry("dataset release", DataError)
"""What ``robustft datasets check`` inspects: one check per release, by release name."""


def _folder_check(name: str) -> ReleaseCheck:
    def check(data_root: Path | None, override: Path | None) -> LayoutReport:
        return check_layout(name, data_root, override)

    return check


for _name in LAYOUTS.names():
    RELEASE_CHECKS.add(_name, _folder_check(_name))


def format_layout_table(reports: Sequence[LayoutReport]) -> str:
    """A plain-text table of reports (one row each, then their problems and notes)."""
    rows = [("dataset", "status", "classes", "images", "path")]
    for r in reports:
        status = "complete" if r.complete else "missing" if not r.present else "incomplete"
        status = "invalid" if status == "incomplete" and not r.found_classes else status
        images = f"{r.found_images}/{r.expected_images}" if r.expected_images else f"{r.found_images}"
        rows.append((r.name, status, f"{r.found_classes}/{r.expected_classes}", images, r.path))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    for r in reports:
        lines.extend(f"  {r.name}: {p.removeprefix(r.name + ': ')}" for p in r.problems)
        lines.extend(f"  {r.name} (note): {n}" for n in r.notes)
    return "\n".join(lines)


def describe_layouts(data_root: str = "DATA_ROOT") -> str:
    """One line per registered dataset: where it goes under ``data_root`` and what it holds."""
    lines = []
    for name in LAYOUTS.names():
        layout = LAYOUTS.get(name)
        where = f"{data_root}/{layout.folders[0]}/"
        also = f" (also accepted: {', '.join(f + '/' for f in layout.folders[1:])})" if len(layout.folders) > 1 else ""
        lines.append(f"{name:<16} {where}: {layout.description}; {layout.expected_images} images{also}")
    return "\n".join(lines)
