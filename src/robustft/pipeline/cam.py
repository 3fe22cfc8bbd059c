"""`robustft cam`: export CAMs, masks and counterfactual images of a run, to choose thresholds.

The npz file holds, for N images (format documented in the README):

- ``images`` [N, 3, H, W] float32 in [0, 1] (after the eval transform),
- ``labels`` [N] int64 (head class indices), ``classnames`` [C] str,
- ``cam_raw`` [N, gh, gw] float32 (before normalisation), ``cam`` [N, gh, gw] (divided by
  each image's max),
- ``mask`` [N, gh, gw] bool (patches replaced, or removed for NoFill strategies),
- ``donors`` [N] int64 (SingleFill) or [N, gh, gw] (MultiFill); absent for NoFill,
- ``counterfactual`` [N, 3, H, W] float32 (NoFill: removed patches shown grey),
- ``masking`` (the spec in paper notation), ``cam_kind``, ``patch_size``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from robustft.data.folder import ImageFolderDataset, list_class_dirs
from robustft.data.transforms import build_transform
from robustft.errors import ConfigError, DataError
from robustft.model import compute_cam, load_classifier
from robustft.ops.cam import normalize_cam
from robustft.ops.masking import build_counterfactual, make_generator, parse_masking
from robustft.pipeline.zeroshot import resolve_device
from robustft.safeio import atomic_write_bytes

__all__ = ["run_cam_export", "load_labelled_images"]

logger = logging.getLogger(__name__)


def _head_index(folder: str, meta: dict) -> int | None:
    names = list(meta["classnames"])
    folder_classes = list(meta.get("extra", {}).get("folder_classes") or [])
    for candidates in (folder_classes, names, [n.replace(" ", "_") for n in names]):
        if folder in candidates:
            return candidates.index(folder)
    return None


def load_labelled_images(root: str | Path, meta: dict, image_size: int, limit: int) -> tuple[Tensor, Tensor]:
    """Up to ``limit`` images of a class-per-folder tree, classes interleaved, as tensors."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--images {str(root)!r} does not exist; give a folder with one sub-folder per class")
    folders = list_class_dirs(root)
    mapping = {f: _head_index(f, meta) for f in folders}
    unknown = [f for f, i in mapping.items() if i is None]
    if unknown or not folders:
        shown = ", ".join(list(meta["classnames"])[:8])
        raise DataError(f"--images {str(root)!r}: class folders {unknown or '(none)'} are not classes of the run; "
                        f"name sub-folders by the run's class names (e.g. {shown}, ...)")
    dataset = ImageFolderDataset(root, folders, build_transform(image_size))
    per_class: dict[int, list[int]] = {}
    for i, t in enumerate(dataset.targets()):
        per_class.setdefault(t, []).append(i)
    order = [idx for rank in range(max(map(len, per_class.values()))) for c in sorted(per_class)
             for idx in per_class[c][rank:rank + 1]][:limit]
    items = [dataset[i] for i in order]
    items = [it for it in items if it is not None]
    if not items:
        raise DataError(f"--images {str(root)!r}: no readable images")
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([mapping[folders[it[1]]] for it in items], dtype=torch.long)
    return images, labels


def run_cam_export(*, run: str, images: str, cam: str, masking: str, out: str, grid: str | None = None,
                   seed: int = 0, limit: int = 64, device: str = "auto") -> str:
    """Compute CAMs and counterfactuals of ``run`` on the images in ``images``; write ``out``."""
    spec = parse_masking(masking)
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if not out.endswith(".npz"):
        raise ConfigError(f"--out {out!r} must end with .npz")
    classifier, meta = load_classifier(run, device=resolve_device(device))
    classifier.require_vit("robustft cam")
    x, y = load_labelled_images(images, meta, classifier.preprocess.image_size, limit)
    dev = next(classifier.parameters()).device
    x, y = x.to(dev), y.to(dev)
    result = compute_cam(classifier, x, y, kind=cam)
    raw = result.raw.detach().float()
    gh, gw = raw.shape[-2:]
    norm = normalize_cam(raw.flatten(1))
    cf = build_counterfactual(x, spec, patch=classifier.patch_size, cam_norm=norm,
                              generator=make_generator(seed, 0, "cpu"))
    counterfactual = cf.images if spec.fill != "none" else _grey_out(x, cf.mask, classifier.patch_size)
    arrays = {
        "images": x.cpu().numpy().astype(np.float32), "labels": y.cpu().numpy().astype(np.int64),
        "classnames": np.array(meta["classnames"]), "cam_raw": raw.cpu().numpy().astype(np.float32),
        "cam": norm.reshape(-1, gh, gw).cpu().numpy().astype(np.float32),
        "mask": cf.mask.reshape(-1, gh, gw).cpu().numpy().astype(bool),
        "counterfactual": counterfactual.detach().cpu().numpy().astype(np.float32),
        "masking": np.array(str(spec)), "cam_kind": np.array(cam), "patch_size": np.array(classifier.patch_size),
    }
    if cf.donors is not None:
        donors = cf.donors.cpu().numpy().astype(np.int64)
        arrays["donors"] = donors.reshape(-1, gh, gw) if donors.ndim == 2 else donors
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(out, buffer.getvalue())
    lines = [f"{len(y)} images, {cam} CAMs, {spec}: mean masked fraction "
             f"{arrays['mask'].mean():.2f} -> {out}"]
    if grid:
        from robustft.reports.cam_grid import plot_cam_grid

        plot_cam_grid(arrays, grid)
        lines.append(f"grid -> {grid}")
    return "\n".join(lines)


def _grey_out(images: Tensor, mask: Tensor, patch: int) -> Tensor:
    """NoFill strategies never show the model the masked patches; draw them grey."""
    b, _, h, w = images.shape
    m = mask.reshape(b, 1, h // patch, w // patch).float()
    m = torch.nn.functional.interpolate(m, scale_factor=patch, mode="nearest").bool()
    return torch.where(m, torch.full_like(images, 0.5), images)
