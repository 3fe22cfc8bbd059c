"""Teacher-CAM cache: the frozen teacher's CAMs, computed once per training image.

When the CAM comes from the frozen teacher (``cam_source="teacher"``) and the training
transform is deterministic (the paper's recipe: resize + center crop, no augmentation),
the CAM of an image is the same every epoch. :func:`load_or_build_teacher_cam_cache`
computes the raw CAMs ``[N, gh, gw]`` of a whole dataset once, stores them as one
safetensors file, and reuses it while nothing it depends on changes. The masked methods
take it as ``build_method(..., teacher_cams=cams)`` and look rows up by ``batch["index"]``.

The file name is a hash of everything the CAMs depend on: a format version, the model
name, a SHA-256 of the teacher's weights (image tower AND head: the CAM is of the
ground-truth logit), the dataset (its root, its ordered file list and labels), the
transform and image size, and the CAM kind. Files are rewritten atomically; a file whose
stored key or shape disagrees is rebuilt. In a distributed run (``dist_env``) rank 0 alone
loads or builds and writes the file while the other ranks wait; they then read the file
rank 0 names, so there is one writer and one build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from robustft.data.folder import collate_skip_bad
from robustft.distributed import DistEnv
from robustft.errors import CheckpointError, ConfigError
from robustft.model.cam import CAM_KINDS, compute_cam
from robustft.model.classifier import ImageClassifier
from robustft.safeio import load_tensors, save_tensors

__all__ = [
    "CACHE_VERSION",
    "default_cam_cache_dir",
    "weights_fingerprint",
    "dataset_fingerprint",
    "transform_fingerprint",
    "cam_cache_key",
    "build_teacher_cam_cache",
    "load_or_build_teacher_cam_cache",
    "read_teacher_cam_cache",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever the CAMs computed for the same inputs change (part of every key)."""

# Transforms whose output depends on a random draw: a cache would freeze one draw forever.
_RANDOM_TRANSFORMS = ("ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform")


def default_cam_cache_dir() -> Path:
    """``$ROBUSTFT_CACHE/cams`` if the variable is set, else ``~/.cache/robustft/cams``."""
    root = os.environ.get("ROBUSTFT_CACHE")
    return (Path(root).expanduser() if root else Path("~/.cache/robustft").expanduser()) / "cams"


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every state-dict entry's name, dtype, shape and bytes (hex)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """Identity of an ImageFolder-style dataset: root, ordered file list and labels (hex SHA-256).

    Supports :class:`robustft.data.folder.ImageFolderDataset` (``root``, ``samples``) and
    index subsets of it (``dataset``, ``indices``); anything else needs an explicit key.

    Raises:
        ConfigError: The dataset cannot be identified; pass ``dataset_key``.
    """
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        return _sha256_json({"base": dataset_fingerprint(dataset.dataset), "indices": list(map(int, dataset.indices))})
    samples = getattr(dataset, "samples", None)
    if samples is None or not hasattr(dataset, "root"):
        raise ConfigError(f"cannot identify a {type(dataset).__name__} for the teacher-CAM cache (it has no root and "
                          "file list); pass dataset_key=<a string that changes whenever the images change>")
    files = [[str(path), int(label)] for path, label in samples]
    return _sha256_json({"root": str(dataset.root), "files": files, "crop": getattr(dataset, "crop_border", 0)})


def _base_transform(dataset: Dataset) -> Callable[..., Any] | None:
    while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return getattr(dataset, "transform", None)


def transform_fingerprint(transform: Callable[..., Any] | None) -> str:
    """A readable description of a (torchvision) transform; refuses random ones.

    Raises:
        ConfigError: The transform draws at random (e.g. a random crop or flip), so a
            cached CAM would not match the image seen in training.
    """
    if transform is None:
        raise ConfigError("the dataset has no transform to identify; pass transform_key=<description>")
    steps = getattr(transform, "transforms", [transform])
    random_steps = [type(s).__name__ for s in steps
                    if type(s).__name__.startswith("Random") or type(s).__name__ in _RANDOM_TRANSFORMS]
    if random_steps:
        raise ConfigError(f"the training transform is random ({', '.join(random_steps)}): teacher CAMs cannot be "
                          "cached; train without augmentation or compute the teacher CAM every step "
                          "(no cache)")
    return " ".join(repr(s) for s in steps)


def cam_cache_key(*, model_name: str, weights: str, dataset: str, transform: str, image_size: int,
                  kind: str, weights_source: str = "") -> dict[str, Any]:
    """Everything a cached CAM depends on, as a JSON-able dict (hash it for the file name)."""
    return {"version": CACHE_VERSION, "model": model_name, "weights": weights, "weights_source": weights_source,
            "dataset": dataset, "transform": transform, "image_size": int(image_size), "kind": kind}


def build_teacher_cam_cache(teacher: ImageClassifier, dataset: Dataset, kind: str = "mmcam", batch_size: int = 64,
                            *, num_workers: int = 0, device: str | torch.device | None = None,
                            progress: bool = True) -> Tensor:
    """Raw CAMs of every item of ``dataset`` by the frozen ``teacher``, in dataset order.

    Args:
        teacher: The frozen zero-shot classifier (a ViT); its mode and weights are untouched.
        dataset: Items ``(image [3, H, W] in [0, 1], label, index)`` or None (unreadable).
        kind: ``"mmcam"`` or ``"gradcam"``.
        batch_size: Images per forward.
        num_workers: DataLoader worker processes.
        device: Where to run the teacher (default: where its parameters are).
        progress: Show a progress bar.

    Returns:
        ``[N, gh, gw]`` float32 on the CPU; row ``i`` is item ``i``'s raw CAM (zeros for
        unreadable images, which training skips anyway).
    """
    if kind not in CAM_KINDS:
        raise ConfigError(f"unknown CAM kind {kind!r}; valid: {', '.join(CAM_KINDS)}")
    teacher.require_vit("the teacher-CAM cache")
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    gh, gw = teacher.grid_size
    cams = torch.zeros(len(dataset), gh, gw, dtype=torch.float32)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_bad, pin_memory=device.type == "cuda")
    done = 0
    for batch in tqdm(loader, desc=f"teacher {kind} CAMs", unit="batch", disable=not progress):
        if batch["label"].numel() == 0:
            continue
        result = compute_cam(teacher, batch["image"].to(device), batch["label"].to(device), kind)
        cams[batch["index"]] = result.raw.float().cpu()
        done += int(batch["label"].numel())
    if done < len(dataset):
        logger.warning("teacher-CAM cache: %d of %d images were unreadable (rows left at zero)",
                       len(dataset) - done, len(dataset))
    return cams


def load_or_build_teacher_cam_cache(teacher: ImageClassifier, dataset: Dataset, *, model_name: str,
                                    weights: str | None = None, kind: str = "mmcam", batch_size: int = 64,
                                    cache_dir: str | os.PathLike[str] | None = None, dataset_key: str | None = None,
                                    transform_key: str | None = None, num_workers: int = 0,
                                    device: str | torch.device | None = None, progress: bool = True,
                                    rebuild: bool = False, dist_env: DistEnv | None = None) -> Tensor:
    """The teacher-CAM cache of ``dataset``: loaded when a matching file exists, else built and saved.

    Args:
        teacher, dataset, kind, batch_size, num_workers, device, progress: As for
            :func:`build_teacher_cam_cache`.
        model_name: The architecture name (e.g. ``"ViT-B-32"``), part of the key.
        weights: Optional label of the weight source (tag or file), recorded in the key
            next to the SHA-256 of the teacher's state (which alone decides a match).
        cache_dir: Folder of cache files (default :func:`default_cam_cache_dir`).
        dataset_key: Explicit dataset identity (default :func:`dataset_fingerprint`).
        transform_key: Explicit transform identity (default :func:`transform_fingerprint`
            of the dataset's transform, which must be deterministic).
        rebuild: Recompute even if a matching file exists.
        dist_env: The run's processes. With several, rank 0 alone loads or builds (and
            writes) the file while the others wait (within the process-group timeout), then
            every other rank reads the file rank 0 names (:func:`read_teacher_cam_cache`);
            the cache folder must therefore be one that every process sees.

    Returns:
        ``[N, gh, gw]`` float32 raw CAMs on the CPU.

    Raises:
        ConfigError: A random transform, an unknown CAM kind, or an unidentifiable dataset.
        CheckpointError: A rank other than 0 cannot read the file rank 0 wrote.
    """
    def load_or_build() -> tuple[Tensor, Path]:
        return _load_or_build(teacher, dataset, model_name=model_name, weights=weights, kind=kind,
                              batch_size=batch_size, cache_dir=cache_dir, dataset_key=dataset_key,
                              transform_key=transform_key, num_workers=num_workers, device=device,
                              progress=progress, rebuild=rebuild)

    if dist_env is None or not dist_env.is_distributed:
        return load_or_build()[0]
    mine: list[Tensor] = []

    def on_rank0() -> str:
        cams, path = load_or_build()
        mine.append(cams)
        return str(path)

    logger.info("teacher-CAM cache: rank 0 loads or builds it; the other %d process(es) wait for it",
                dist_env.world_size - 1)
    path = dist_env.on_primary(on_rank0)
    error = None
    if not mine:
        try:
            mine.append(read_teacher_cam_cache(path, (len(dataset), *teacher.grid_size)))
        except CheckpointError as exc:
            error = f"rank {dist_env.rank}: {exc}"
    failed = [e for e in dist_env.all_gather_object(error) if e is not None]
    if failed:  # every rank stops, not only the one that could not read the file
        raise CheckpointError(failed[0])
    return mine[0]


def read_teacher_cam_cache(path: str | os.PathLike[str], expected: tuple[int, ...]) -> Tensor:
    """The CAMs of a cache file another process wrote, checked against the ``expected`` shape.

    Raises:
        CheckpointError: The file is missing, unreadable or of another shape.
    """
    fix = "give every process the same cache folder (ROBUSTFT_CACHE on a shared file system)"
    if not Path(path).is_file():
        raise CheckpointError(f"teacher-CAM cache {path} written by rank 0 is not visible here; {fix}")
    tensors, _ = load_tensors(path)
    cams = tensors.get("cams")
    if cams is None or tuple(cams.shape) != tuple(expected):
        shape = None if cams is None else tuple(cams.shape)
        raise CheckpointError(f"teacher-CAM cache {path} holds CAMs of shape {shape}, this process expects "
                              f"{tuple(expected)}; {fix}")
    return cams.float()


def _load_or_build(teacher: ImageClassifier, dataset: Dataset, *, model_name: str, weights: str | None, kind: str,
                   batch_size: int, cache_dir: str | os.PathLike[str] | None, dataset_key: str | None,
                   transform_key: str | None, num_workers: int, device: str | torch.device | None, progress: bool,
                   rebuild: bool) -> tuple[Tensor, Path]:
    """:func:`load_or_build_teacher_cam_cache` in one process; also returns the file's path."""
    key = cam_cache_key(
        model_name=model_name, weights=weights_fingerprint(teacher), weights_source=weights or "",
        dataset=dataset_key if dataset_key is not None else dataset_fingerprint(dataset),
        transform=transform_key if transform_key is not None else transform_fingerprint(_base_transform(dataset)),
        image_size=teacher.preprocess.image_size, kind=kind)
    digest = _sha256_json(key)
    path = Path(cache_dir) if cache_dir is not None else default_cam_cache_dir()
    path = path / f"teacher-{kind}-{digest[:24]}.safetensors"
    expected = (len(dataset), *teacher.grid_size)
    if path.is_file() and not rebuild:
        try:
            tensors, meta = load_tensors(path)
        except CheckpointError as exc:
            logger.warning("teacher-CAM cache %s is unreadable (%s); rebuilding it", path, exc)
        else:
            cams = tensors.get("cams")
            matches = meta.get("key") == json.dumps(key, sort_keys=True)
            if matches and cams is not None and tuple(cams.shape) == expected:
                logger.info("teacher-CAM cache: loaded %s", path)
                return cams.float(), path
            logger.warning("teacher-CAM cache %s does not match this run; rebuilding it", path)
    cams = build_teacher_cam_cache(teacher, dataset, kind, batch_size, num_workers=num_workers, device=device,
                                   progress=progress)
    save_tensors(path, {"cams": cams}, metadata={"key": json.dumps(key, sort_keys=True)})
    logger.info("teacher-CAM cache: wrote %s (%d images)", path, len(dataset))
    return cams, path
