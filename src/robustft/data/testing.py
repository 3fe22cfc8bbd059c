"""Builders of tiny fake dataset trees laid out exactly like the official releases.

Tests (this package's and the CLI's) use them to exercise the real code paths without the
real data: the folder names are the real ones (WNIDs, V2's class indices, ObjectNet's
folder names and mapping files in the release's own format), only the images are small
random pictures. Each builder returns the folder it created, takes ``classes`` as a count
(spread evenly over the real class list; ``n_classes=`` is an alias) or as explicit
names, and can hard-link the images of a class to one file (``hardlink=True``) so that
full-size trees are cheap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from robustft.data.classnames import imagenet_a_wnids, imagenet_lemmas, imagenet_r_wnids, imagenet_wnids

__all__ = [
    "FAKE_OBJECTNET_MAPPED",
    "FAKE_OBJECTNET_UNMAPPED",
    "pick_classes",
    "write_image",
    "write_corrupt_image",
    "make_image_folder",
    "make_fake_imagenet",
    "make_fake_imagenet_v2",
    "make_fake_imagenet_r",
    "make_fake_imagenet_a",
    "make_fake_imagenet_sketch",
    "make_fake_objectnet",
]

# Real ObjectNet folders, class names and ImageNet labels (as the release's mapping files
# spell them); a few map to several ImageNet classes.
FAKE_OBJECTNET_MAPPED: dict[str, tuple[str, str]] = {
    "alarm_clock": ("Alarm clock", "analog clock; digital clock"),
    "banana": ("Banana", "banana"),
    "band_aid": ("Band Aid", "Band Aid"),
    "bench": ("Bench", "park bench"),
    "bicycle": (
        "Bicycle",
        "mountain bike, all-terrain bike, off-roader; bicycle-built-for-two, tandem bicycle, tandem",
    ),
    "chair": ("Chair", "barber chair; folding chair; rocking chair, rocker"),
    "dress_shoe_men": ("Dress shoe (men)", "Loafer"),
    "sunglasses": ("Sunglasses", "sunglasses, dark glasses, shades"),
}
FAKE_OBJECTNET_UNMAPPED: dict[str, str] = {"squeegee": "Squeegee", "eyeglasses": "Eyeglasses", "dog_bed": "Dog bed"}

RED = (255, 0, 0)


def pick_classes(all_classes: Sequence[str], classes: int | Sequence[str] | None) -> list[str]:
    """``classes`` names as given, or that many spread evenly over ``all_classes`` (None: all)."""
    if classes is None:
        return list(all_classes)
    if isinstance(classes, int):
        if classes <= 0 or classes > len(all_classes):
            raise ValueError(f"classes must be in [1, {len(all_classes)}], got {classes}")
        if classes == 1:
            return [all_classes[0]]
        step = (len(all_classes) - 1) / (classes - 1)
        return [all_classes[round(i * step)] for i in range(classes)]
    return [str(c) for c in classes]


def write_image(path: str | os.PathLike[str], *, size: int = 40, seed: int = 0, border: int = 0) -> Path:
    """Write a random ``size`` x ``size`` RGB image (format from the suffix).

    The picture is blue-grey noise, so it holds no pure red; ``border`` paints that many
    pixels on every side pure red (255, 0, 0), like ObjectNet's frame.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = np.array([60, 90, 170]) + rng.integers(-40, 40, size=3)
    pixels = np.clip(base + rng.integers(-30, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
    if border:
        pixels[:border], pixels[-border:], pixels[:, :border], pixels[:, -border:] = RED, RED, RED, RED
    image = Image.fromarray(pixels, "RGB")
    fmt = "JPEG" if out.suffix.lower() in {".jpg", ".jpeg"} else None
    image.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out


def write_corrupt_image(path: str | os.PathLike[str], kind: str = "truncated") -> Path:
    """Write an unreadable image file: ``"truncated"`` JPEG, ``"garbage"`` bytes or ``"empty"``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        write_image(out.with_suffix(".tmp.jpg"), size=64)
        data = out.with_suffix(".tmp.jpg").read_bytes()
        out.with_suffix(".tmp.jpg").unlink()
        out.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        out.write_bytes(b"this is not an image" * 10)
    elif kind == "empty":
        out.write_bytes(b"")
    else:
        raise ValueError(f"unknown corruption kind {kind!r}; valid: truncated, garbage, empty")
    return out


def _fill(folder: Path, names: Sequence[str], *, size: int, seed: int, border: int, hardlink: bool) -> None:
    first: Path | None = None
    for j, name in enumerate(names):
        path = folder / name
        if hardlink and first is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(first, path)
            continue
        first = write_image(path, size=size, seed=seed * 100_003 + j, border=border)


def make_image_folder(
    root: str | os.PathLike[str], classes: Sequence[str], per_class: int = 2, *, size: int = 40,
    seed: int = 0, ext: str = ".png", border: int = 0, hardlink: bool = False,
) -> Path:
    """``root/<class>/<class>_<i><ext>`` with ``per_class`` images per class; returns ``root``."""
    out = Path(root)
    for c, name in enumerate(classes):
        (out / name).mkdir(parents=True, exist_ok=True)
        files = [f"{name}_{i}{ext}" for i in range(per_class)]
        _fill(out / name, files, size=size, seed=seed * 7919 + c, border=border, hardlink=hardlink)
    return out


def _wnid_tree(folder: Path, wnids: Sequence[str], per_class: int, pattern: str, *, size: int,
               hardlink: bool, seed: int) -> Path:
    counter = 0
    for c, wnid in enumerate(wnids):
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        names = [pattern.format(wnid=wnid, i=i, n=counter + i + 1) for i in range(per_class)]
        counter += per_class
        _fill(folder / wnid, names, size=size, seed=seed * 7919 + c, border=0, hardlink=hardlink)
    return folder


def make_fake_imagenet(
    root: str | os.PathLike[str], *, classes: int | Sequence[str] | None = 5, per_class: int = 2, split: str = "val",
    size: int = 40, hardlink: bool = False, seed: int = 0, n_classes: int | None = None,
) -> Path:
    """``root/imagenet/<split>/<wnid>/*.JPEG``; returns ``root/imagenet``."""
    wnids = pick_classes(imagenet_wnids(), n_classes or classes)
    pattern = "ILSVRC2012_val_{n:08d}.JPEG" if split == "val" else "{wnid}_{i}.JPEG"
    _wnid_tree(Path(root) / "imagenet" / split, wnids, per_class, pattern, size=size, hardlink=hardlink, seed=seed)
    return Path(root) / "imagenet"


def make_fake_imagenet_v2(
    root: str | os.PathLike[str], *, classes: int | Sequence[int] | None = 5, per_class: int = 2, size: int = 40,
    hardlink: bool = False, seed: int = 0, n_classes: int | None = None,
) -> Path:
    """``root/imagenetv2-matched-frequency-format-val/<class index>/<hash>.jpeg``."""
    classes = n_classes or classes
    names = pick_classes([str(i) for i in range(1000)], classes if isinstance(classes, int) or classes is None
                         else [str(int(c)) for c in classes])
    folder = Path(root) / "imagenetv2-matched-frequency-format-val"
    return _wnid_tree(folder, names, per_class, "{n:040x}.jpeg", size=size, hardlink=hardlink, seed=seed)


def make_fake_imagenet_r(
    root: str | os.PathLike[str], *, classes: int | Sequence[str] | None = 5, per_class: int = 2, size: int = 40,
    hardlink: bool = False, seed: int = 0, n_classes: int | None = None,
) -> Path:
    """``root/imagenet-r/<wnid>/art_<i>.jpg`` over ImageNet-R's WNIDs."""
    folder = Path(root) / "imagenet-r"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("fake ImageNet-R\n")
    wnids = pick_classes(imagenet_r_wnids(), n_classes or classes)
    return _wnid_tree(folder, wnids, per_class, "art_{i}.jpg", size=size, hardlink=hardlink, seed=seed)


def make_fake_imagenet_a(
    root: str | os.PathLike[str], *, classes: int | Sequence[str] | None = 5, per_class: int = 2, size: int = 40,
    hardlink: bool = False, seed: int = 0, n_classes: int | None = None,
) -> Path:
    """``root/imagenet-a/<wnid>/<n>.jpg`` over ImageNet-A's WNIDs."""
    folder = Path(root) / "imagenet-a"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.txt").write_text("fake ImageNet-A\n")
    wnids = pick_classes(imagenet_a_wnids(), n_classes or classes)
    return _wnid_tree(folder, wnids, per_class, "{n:06d}.jpg", size=size, hardlink=hardlink, seed=seed)


def make_fake_imagenet_sketch(
    root: str | os.PathLike[str], *, classes: int | Sequence[str] | None = 5, per_class: int = 2, size: int = 40,
    nested: bool = False, hardlink: bool = False, seed: int = 0, n_classes: int | None = None,
) -> Path:
    """``root/sketch/<wnid>/sketch_<i>.JPEG`` (or ``root/imagenet-sketch/sketch/...`` if ``nested``)."""
    folder = Path(root) / ("imagenet-sketch/sketch" if nested else "sketch")
    wnids = pick_classes(imagenet_wnids(), n_classes or classes)
    return _wnid_tree(folder, wnids, per_class, "sketch_{i}.JPEG", size=size, hardlink=hardlink, seed=seed)


def _write_objectnet_mappings(folder: Path, seed: int) -> None:
    """The four mapping files of ``objectnet-1.0/mappings/``, in the release's format."""
    folder.mkdir(parents=True, exist_ok=True)
    to_label = {f: label for f, (label, _) in FAKE_OBJECTNET_MAPPED.items()} | FAKE_OBJECTNET_UNMAPPED
    to_imagenet = {label: names for label, names in FAKE_OBJECTNET_MAPPED.values()}
    # The label file lists ImageNet in the devkit's ID order, not WNID order; a seeded
    # permutation stands in for it, so the head-index -> line indirection is exercised.
    line_of_head = np.random.default_rng(seed).permutation(1000).tolist()
    lemmas = imagenet_lemmas()
    lines = [""] * 1000
    for head, line in enumerate(line_of_head):
        lines[line] = lemmas[head]
    (folder / "folder_to_objectnet_label.json").write_text(json.dumps(to_label, indent=2))
    (folder / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet, indent=2))
    (folder / "pytorch_to_imagenet_2012_id.json").write_text(
        json.dumps({str(h): line for h, line in enumerate(line_of_head)}, indent=2)
    )
    (folder / "imagenet_to_label_2012_v2").write_text("\n".join(lines) + "\n")


def make_fake_objectnet(root: str | os.PathLike[str], *, classes: Sequence[str] | None = None, per_class: int = 2,
                        size: int = 40, seed: int = 0) -> Path:
    """``root/objectnet-1.0/{images/<folder>/<hash>.png, mappings/...}``; returns ``root/objectnet-1.0``.

    Every image has a 2-px pure red border. ``classes`` picks folders among
    ``FAKE_OBJECTNET_MAPPED`` and ``FAKE_OBJECTNET_UNMAPPED`` (default: all of them); the
    mapping files always describe all of them.
    """
    base = Path(root) / "objectnet-1.0"
    _write_objectnet_mappings(base / "mappings", seed)
    (base / "README").write_text("fake ObjectNet 1.0\n")
    folders = list(classes) if classes is not None else [*FAKE_OBJECTNET_MAPPED, *FAKE_OBJECTNET_UNMAPPED]
    for c, name in enumerate(folders):
        for i in range(per_class):
            write_image(base / "images" / name / f"{c:04x}{i:028x}.png", size=size, seed=seed * 7919 + 31 * c + i,
                        border=2)
    return base
