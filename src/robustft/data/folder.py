"""Class-per-folder image datasets that survive unreadable files.

:class:`ImageFolderDataset` reads ``root/<class folder>/**/<image>`` with an explicit class
list (the folder names in label order), so a dataset's labels never depend on which
folders happen to be on disk or on how their names sort. The file list is built once,
sorted, and is the same on every machine.

An unreadable or corrupt image (a truncated download, a zero-byte file, a file that is
not an image) is not fatal: ``__getitem__`` returns ``None`` for it, flags it in a
shared-memory table (so flags set inside DataLoader worker processes reach the main
process) and :func:`collate_skip_bad` drops it from the batch and counts it. Callers sum
``batch["n_bad"]``, call :func:`check_bad_fraction` at the end of a pass and keep the list
of bad files with :func:`record_bad_paths` (``RUN/bad_images.txt``, one path per line).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from robustft.errors import DataError
from robustft.safeio import atomic_write_text

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "list_class_dirs",
    "list_images",
    "ImageListDataset",
    "ImageFolderDataset",
    "IndexedSubset",
    "collate_skip_bad",
    "BadImageTracker",
    "check_bad_fraction",
    "record_bad_paths",
    "BAD_IMAGES_FILE",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# What a corrupt or truncated file raises while PIL opens or decodes it. Anything else
# (for example an error inside the transform) is a bug and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

Sample = tuple[torch.Tensor, int, int]

#: The file, in a run folder, that lists every unreadable image the run met (one path per line).
BAD_IMAGES_FILE = "bad_images.txt"


def list_class_dirs(path: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``path`` (files are ignored)."""
    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_images(folder: str | os.PathLike[str], extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Paths of all image files under ``folder`` (recursively, links followed), sorted."""
    exts = tuple(e.lower() for e in extensions)
    found: list[str] = []
    # Plain strings, not Path objects: ImageNet's train/ holds 1.28M files.
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(exts) and not f.startswith("."))
    found.sort()
    return found


class ImageListDataset(Dataset):
    """Images given as an explicit ``[(path, label)]`` list (releases that list their files in CSVs).

    Args:
        samples: ``(path, label)`` pairs, in item order.
        classes: Class names in label order (label ``i`` is ``classes[i]``).
        transform: Maps an RGB PIL image to a tensor ``[3, H, W]`` in ``[0, 1]``.
        crop_border: Pixels cut from every side of the image before ``transform``.
        jpeg_draft: Let PIL decode JPEGs at a reduced scale that still covers ``draft_size``.
        draft_size: Smallest side the draft decode must keep, in pixels.

    Items are ``(image [3, H, W] float in [0, 1], label, index)``, with ``index`` the item's
    position in this dataset, or ``None`` for an unreadable file (see :func:`collate_skip_bad`).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        crop_border: int = 0,
        jpeg_draft: bool = False,
        draft_size: int = 224,
    ) -> None:
        self.classes = list(classes)
        self.transform = transform
        self.crop_border = int(crop_border)
        self.jpeg_draft = jpeg_draft
        self.draft_size = int(draft_size)
        self.samples = [(str(path), int(label)) for path, label in samples]
        # One byte per file, in shared memory so that worker processes' flags are seen here.
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> list[int]:
        """The label of every item, in item order (no image is read)."""
        return [label for _, label in self.samples]

    def load_image(self, path: str) -> Image.Image:
        """Open ``path`` as an RGB PIL image, border-cropped; raises PIL's errors."""
        with Image.open(path) as img:
            if self.jpeg_draft and img.format == "JPEG":
                img.draft("RGB", (self.draft_size, self.draft_size))
            rgb = img.convert("RGB")
        b = self.crop_border
        if b:
            width, height = rgb.size
            if width <= 2 * b or height <= 2 * b:
                raise ValueError(f"image of {width}x{height} px is too small for a {b}-px border crop")
            rgb = rgb.crop((b, b, width - b, height - b))
        return rgb

    def __getitem__(self, index: int) -> Sample | None:
        path, label = self.samples[index]
        try:
            image = self.load_image(path)
        except _LOAD_ERRORS as exc:
            self._bad[index] = 1
            logger.warning("skipping unreadable image %s (%s: %s)", path, type(exc).__name__, exc)
            return None
        return self.transform(image), label, index

    def bad_paths(self) -> list[str]:
        """Files found unreadable so far (by this process or its loader workers), sorted."""
        return [self.samples[i][0] for i in torch.nonzero(self._bad).flatten().tolist()]

    def with_transform(self, transform: Callable[[Image.Image], torch.Tensor]) -> ImageListDataset:
        """A copy that shares the file list and bad-file flags but uses ``transform``."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone


class ImageFolderDataset(ImageListDataset):
    """Images in ``root/<class>/...`` with labels given by an explicit class list.

    Args:
        root: Folder holding one sub-folder per class.
        classes: Class folder names in label order (label ``i`` is ``classes[i]``).
        transform: Maps an RGB PIL image to a tensor ``[3, H, W]`` in ``[0, 1]``.
        extensions: File name endings (case-insensitive) counted as images.
        allow_missing: Accept class folders that do not exist (they contribute no images);
            otherwise a missing folder raises :class:`DataError`.
        crop_border: Pixels cut from every side of the image before ``transform``
            (ObjectNet's 2-px red border).
        jpeg_draft: Let PIL decode JPEGs at a reduced scale that still covers
            ``draft_size``; faster, but pixels differ slightly from a full decode.
        draft_size: Smallest side the draft decode must keep, in pixels.

    Items are ``(image [3, H, W] float in [0, 1], label, index)``, with ``index`` the item's
    position in this dataset, or ``None`` for an unreadable file (see :func:`collate_skip_bad`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        classes: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        allow_missing: bool = False,
        crop_border: int = 0,
        jpeg_draft: bool = False,
        draft_size: int = 224,
    ) -> None:
        self.root = Path(root)
        self.classes = list(classes)
        super().__init__(self._scan(tuple(extensions), allow_missing), classes, transform,
                         crop_border=crop_border, jpeg_draft=jpeg_draft, draft_size=draft_size)

    def _scan(self, extensions: tuple[str, ...], allow_missing: bool) -> list[tuple[str, int]]:
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"class list for {self.root} repeats a class name")
        samples: list[tuple[str, int]] = []
        missing = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                missing.append(name)
                continue
            samples.extend((path, label) for path in list_images(folder, extensions))
        if missing and not allow_missing:
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise DataError(f"expected class folders missing under {self.root}: {shown}")
        return samples

class IndexedSubset(Dataset):
    """The items ``indices`` of ``dataset``, re-indexed ``0..len(indices)-1``.

    Unlike ``torch.utils.data.Subset`` the third element of each item is the position in
    the subset, so ``index`` always counts ``0..len(self)-1`` for whatever is iterated.
    """

    def __init__(self, dataset: ImageListDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample | None:
        item = self.dataset[self.indices[index]]
        return None if item is None else (item[0], item[1], index)

    def targets(self) -> list[int]:
        """The label of every item of the subset, in item order."""
        labels = self.dataset.targets()
        return [labels[i] for i in self.indices]

    def bad_paths(self) -> list[str]:
        """Unreadable files of the subset met so far."""
        bad = set(self.dataset.bad_paths())
        return [self.dataset.samples[i][0] for i in self.indices if self.dataset.samples[i][0] in bad]


def collate_skip_bad(batch: Sequence[Sample | None]) -> dict[str, Any]:
    """Stack ``(image, label, index)`` items into a batch, dropping ``None`` (unreadable) items.

    Returns:
        ``{"image": [B, 3, H, W] float, "label": [B] long, "index": [B] long, "n_bad": int}``
        where ``B`` counts the readable items; when every item is unreadable, ``image`` is
        an empty ``[0, 3, 0, 0]`` tensor.
    """
    good = [item for item in batch if item is not None]
    n_bad = len(batch) - len(good)
    if not good:
        empty = torch.zeros(0, dtype=torch.long)
        return {"image": torch.zeros(0, 3, 0, 0), "label": empty, "index": empty.clone(), "n_bad": n_bad}
    return {
        "image": torch.stack([item[0] for item in good]),
        "label": torch.tensor([int(item[1]) for item in good], dtype=torch.long),
        "index": torch.tensor([int(item[2]) for item in good], dtype=torch.long),
        "n_bad": n_bad,
    }


def check_bad_fraction(
    n_bad: int, n_total: int, max_fraction: float = 0.001, paths: Sequence[str] = (), *, what: str = "dataset",
    setting: str | None = None, listing: str | os.PathLike[str] | None = None,
) -> None:
    """Raise :class:`DataError` listing the bad files if too many images were unreadable.

    Args:
        n_bad: Unreadable images met.
        n_total: Images attempted (readable + unreadable).
        max_fraction: Largest tolerated ``n_bad / n_total``, in ``[0, 1]`` (default 0.1%).
        paths: The unreadable files, for the message (at most 20 are listed).
        what: The dataset's name, for the message.
        setting: Where the user sets the limit (``data.max_bad_fraction``), for the message.
        listing: The file that lists every bad path (see :func:`record_bad_paths`), for the message.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise DataError(f"max bad-image fraction must be in [0, 1], got {max_fraction}")
    if n_bad <= 0 or n_total <= 0:
        return
    fraction = n_bad / n_total
    listed = ", ".join(paths[:20]) + (f", ... ({len(paths)} in all)" if len(paths) > 20 else "")
    listed = listed or "(paths not recorded)"
    where = f" (all listed in {listing})" if listing is not None else ""
    if fraction > max_fraction:
        limit = f" ({setting})" if setting else ""
        raise DataError(
            f"{what}: {n_bad} of {n_total} images unreadable ({100 * fraction:.3f}%), above the limit of "
            f"{100 * max_fraction:.3f}%{limit}; fix or delete these files{where}: {listed}"
        )
    logger.warning("%s: skipped %d unreadable of %d images%s: %s", what, n_bad, n_total, where, listed)


def record_bad_paths(path: str | os.PathLike[str], paths: Iterable[str]) -> list[str]:
    """Add ``paths`` to the list of bad files at ``path`` (one per line, sorted, no repeats).

    Paths already listed stay listed (a resumed run keeps those met before it stopped). The
    file is replaced atomically; nothing is written when there is nothing to list.

    Returns:
        Every path now listed.
    """
    out = Path(path)
    known = set(out.read_text(encoding="utf-8").splitlines()) if out.is_file() else set()
    merged = sorted((known | {str(p) for p in paths}) - {""})
    if merged and set(merged) != known:
        atomic_write_text(out, "".join(f"{p}\n" for p in merged))
    return merged


@dataclass
class BadImageTracker:
    """Counts readable and unreadable images over a pass, batch by batch.

    Example:
        ``tracker.update(batch)`` per batch, then ``tracker.check(max_fraction, dataset)``.
    """

    n_good: int = 0
    n_bad: int = 0
    paths: list[str] = field(default_factory=list)

    @property
    def n_total(self) -> int:
        """Images attempted so far."""
        return self.n_good + self.n_bad

    def update(self, batch: dict[str, Any]) -> None:
        """Add one collated batch's counts."""
        self.n_good += int(batch["label"].shape[0])
        self.n_bad += int(batch["n_bad"])

    def check(self, max_fraction: float = 0.001, dataset: Any = None, *, what: str = "dataset") -> None:
        """Collect the bad paths from ``dataset`` (if it records them) and apply the limit."""
        if dataset is not None and hasattr(dataset, "bad_paths"):
            self.paths = list(dataset.bad_paths())
        check_bad_fraction(self.n_bad, self.n_total, max_fraction, self.paths, what=what)
