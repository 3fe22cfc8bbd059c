"""A trained classifier on disk: ``classifier.safetensors`` + ``classifier.json``.

The tensor file holds the :class:`ImageClassifier` state dict under its own names
(``visual.<open_clip names>``, ``head.weight``, ``head.bias``); the JSON file says how to
rebuild the module around them (architecture, preprocessing, class names, templates) and
where it came from (robustft version, git SHA, the original weight source). Loading
rebuilds the architecture with random weights (no download) and fills in the tensors;
nothing is unpickled. The JSON is written last, so its presence marks a complete save.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU

import robustft
from robustft.provenance import git_sha
from robustft.errors import CheckpointError, ModelError
from robustft.model.classifier import ClassifierHead, ImageClassifier
from robustft.model.clip import load_clip
from robustft.model.transforms import PreprocessCfg
from robustft.safeio import load_tensors, read_json, save_tensors, write_json

__all__ = ["save_classifier", "load_classifier", "read_classifier_meta", "TENSORS_FILE", "META_FILE",
           "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

TENSORS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
FORMAT_NAME = "robustft-classifier"
FORMAT_VERSION = 1
_REQUIRED_KEYS = ("format", "format_version", "model_name", "preprocess", "classnames")


def save_classifier(
    classifier: ImageClassifier,
    run_dir: str | os.PathLike[str],
    *,
    model_name: str,
    pretrained: str,
    classnames: Sequence[str],
    templates: Sequence[str],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``classifier`` into ``run_dir`` (created if needed), atomically per file.

    Args:
        classifier: The classifier to save.
        run_dir: Destination folder.
        model_name: open_clip architecture it was built from (e.g. "ViT-B-32").
        pretrained: The original weight source (tag or path); informational only.
        classnames: C class names, in head-row order.
        templates: Templates of the zero-shot head it started from.
        extra: More JSON-serialisable metadata (method, config, metrics, ...).

    Returns:
        The path of the JSON metadata file.
    """
    if len(classnames) != classifier.num_classes:
        raise ModelError(f"{len(classnames)} class names given for a head with {classifier.num_classes} classes")
    run_dir = Path(run_dir)
    state = classifier.state_dict()
    save_tensors(run_dir / TENSORS_FILE, state, {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "robustft_version": robustft.__version__,
        "git_sha": git_sha(),
        "model_name": model_name,
        "pretrained": pretrained,
        "preprocess": classifier.preprocess.to_dict(),
        # OpenAI weights need QuickGELU; the architecture name alone does not say so.
        "quick_gelu": any(isinstance(m, QuickGELU) for m in classifier.visual.modules()),
        "num_classes": classifier.num_classes,
        "classnames": list(classnames),
        "templates": list(templates),
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in state.items()
        },
        "extra": dict(extra) if extra is not None else {},
    }
    meta_path = run_dir / META_FILE
    write_json(meta_path, meta)
    logger.info("saved classifier to %s", run_dir)
    return meta_path


def load_classifier(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild a classifier saved by :func:`save_classifier`.

    Args:
        path: The run folder, or its ``classifier.json`` / ``classifier.safetensors``.
        device: Where to put the classifier.

    Returns:
        ``(classifier in eval mode, metadata dict)``.

    Raises:
        CheckpointError: Missing files, a foreign or newer format, or tensors whose names,
            shapes or dtypes do not match the architecture (all mismatches listed).
    """
    meta_path, tensors_path = _resolve_paths(Path(path))
    meta = read_json(meta_path)
    _check_meta(meta, meta_path)
    tensors, _ = load_tensors(tensors_path)
    classifier = _build_empty(meta, meta_path)
    problems = _state_mismatches(classifier.state_dict(), tensors)
    if problems:
        shown = "; ".join(problems[:20]) + (f"; ... ({len(problems)} in all)" if len(problems) > 20 else "")
        raise CheckpointError(f"{tensors_path} does not fit {meta['model_name']!r}: {shown}")
    classifier.load_state_dict(tensors, strict=True)
    classifier.to(device).eval()
    return classifier, meta


def read_classifier_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked metadata (``classifier.json``) of a saved classifier, without loading its tensors.

    Args:
        path: The run folder, or its ``classifier.json`` / ``classifier.safetensors``.

    Raises:
        CheckpointError: As :func:`load_classifier` for missing files or a foreign or newer format.
    """
    meta_path, _ = _resolve_paths(Path(path))
    meta = read_json(meta_path)
    _check_meta(meta, meta_path)
    return meta


def _resolve_paths(path: Path) -> tuple[Path, Path]:
    if not path.exists():
        raise CheckpointError(f"classifier run not found: {path}")
    if path.is_dir():
        meta_path, tensors_path = path / META_FILE, path / TENSORS_FILE
    elif path.suffix in (".json", ".safetensors"):
        # Either file of a pair names the other (classifier.json + classifier.safetensors).
        meta_path, tensors_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
    else:
        raise CheckpointError(
            f"no saved classifier at {path}: expected a run folder with {META_FILE} and {TENSORS_FILE}"
        )
    for needed in (meta_path, tensors_path):
        if not needed.is_file():
            raise CheckpointError(f"incomplete or missing classifier run: {needed} not found")
    return meta_path, tensors_path


def _check_meta(meta: Any, meta_path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path} is not a robustft classifier file (format must be {FORMAT_NAME!r})")
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks required keys {missing}")
    version = meta["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format_version {version!r}; this robustft reads up to {FORMAT_VERSION} (upgrade robustft)"
        )


def _build_empty(meta: dict[str, Any], meta_path: Path) -> ImageClassifier:
    """The classifier's architecture with random weights (nothing downloaded)."""
    try:
        bundle = load_clip(meta["model_name"], "none", quick_gelu=bool(meta.get("quick_gelu", False)))
        preprocess = PreprocessCfg.from_dict(meta["preprocess"])
    except ModelError as exc:
        raise CheckpointError(f"{meta_path}: cannot rebuild the architecture: {exc}") from exc
    cfg = open_clip.get_model_config(bundle.name) or {}
    embed_dim = int(cfg.get("embed_dim") or bundle.model.visual.output_dim)
    head = ClassifierHead(torch.zeros(len(meta["classnames"]), embed_dim))
    return ImageClassifier(bundle.model.visual, head, preprocess)


def _state_mismatches(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences in names, shapes and dtypes."""
    problems = [f"missing tensor {name!r}" for name in expected if name not in found]
    problems += [f"unexpected tensor {name!r}" for name in found if name not in expected]
    for name, want in expected.items():
        got = found.get(name)
        if got is None:
            continue
        if got.shape != want.shape:
            problems.append(f"{name!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{name!r} has dtype {got.dtype}, expected {want.dtype}")
    return problems
