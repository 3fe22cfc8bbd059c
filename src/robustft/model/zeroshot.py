"""The zero-shot head: one text embedding per class, averaged over prompt templates.

For each class name, every template is filled in, encoded by the text tower and
L2-normalised; the embeddings are averaged over templates and normalised again (CLIP's
recipe, as open_clip's ``build_zero_shot_classifier`` computes it). Building the 1000 x 80
ImageNet head takes minutes on CPU, so results are cached on disk as safetensors, keyed by
a hash of the text tower's weights, the tokenizer, the class names and the templates.

Cache folder: the ``cache_dir`` argument, else ``$ROBUSTFT_CACHE/zeroshot``, else
``~/.cache/robustft/zeroshot``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from robustft.errors import CheckpointError, ConfigError
from robustft.model.prompts import check_templates
from robustft.safeio import load_tensors, save_tensors

__all__ = ["build_zeroshot_weights", "default_cache_dir", "zeroshot_cache_key"]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "robustft-zeroshot-v1"


def default_cache_dir() -> Path:
    """``$ROBUSTFT_CACHE/zeroshot`` if the variable is set, else ``~/.cache/robustft/zeroshot``."""
    root = os.environ.get("ROBUSTFT_CACHE")
    return (Path(root).expanduser() if root else Path("~/.cache/robustft").expanduser()) / "zeroshot"


def build_zeroshot_weights(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    batch_classes: int = 10,
    device: str | torch.device | None = None,
    progress: bool = True,
    use_cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Tensor:
    """Compute the zero-shot class embedding matrix W.

    Args:
        model: An open_clip model with ``encode_text``.
        tokenizer: The model's tokenizer.
        classnames: C class names, in class-index order.
        templates: T format strings with one ``{}`` each.
        batch_classes: Classes encoded per text-tower call (batch_classes * T prompts).
        device: Where to tokenise to; defaults to the model's device.
        progress: Show a progress bar (only when stderr is a terminal).
        use_cache: Read and write the disk cache.
        cache_dir: Cache folder (see module docstring for the default).

    Returns:
        W [C, D] (unit rows, the model's dtype) on ``device``. The classifier head uses
        ``logit_scale.exp() * W``.
    """
    if len(classnames) == 0:
        raise ConfigError("no class names given for the zero-shot head")
    check_templates(templates)
    if batch_classes < 1:
        raise ConfigError(f"batch_classes must be >= 1, got {batch_classes}")
    if device is None:
        device = next(model.parameters()).device
    if not use_cache:
        return _encode_classes(model, tokenizer, classnames, templates, batch_classes, device, progress)

    key = zeroshot_cache_key(model, tokenizer, classnames, templates)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{key[:40]}.safetensors"
    cached = _read_cache(path, key, len(classnames))
    if cached is not None:
        logger.info("zero-shot head: cache hit %s", path)
        return cached.to(device)
    weights = _encode_classes(model, tokenizer, classnames, templates, batch_classes, device, progress)
    _write_cache(path, key, weights, len(templates))
    return weights


def _encode_classes(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_classes: int,
    device: str | torch.device,
    progress: bool,
) -> Tensor:
    """Encode every class in batches: returns [C, D]."""
    num_templates = len(templates)
    rows: list[Tensor] = []
    show = progress and sys.stderr.isatty()
    with torch.no_grad(), tqdm(total=len(classnames), unit="class", desc="zero-shot head", disable=not show) as bar:
        for batch in _chunks(classnames, batch_classes):
            texts = [template.format(name) for name in batch for template in templates]
            tokens = tokenizer(texts).to(device)
            emb = F.normalize(model.encode_text(tokens), dim=-1)  # [n * T, D]
            emb = emb.reshape(len(batch), num_templates, -1).mean(dim=1)
            rows.append(F.normalize(emb, dim=-1))
            bar.update(len(batch))
    return torch.cat(rows, dim=0)


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def zeroshot_cache_key(
    model: nn.Module, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str], templates: Sequence[str]
) -> str:
    """SHA-256 over everything the zero-shot weights depend on.

    The text side of the model is identified by its weights (names, shapes, dtypes and
    bytes of every tensor outside the image tower), so a fine-tuned or differently loaded
    model can never hit another model's cache entry, whatever name it was loaded under.
    """
    digest = hashlib.sha256()
    header = {
        "format": _CACHE_FORMAT,
        "model": type(model).__qualname__,
        "tokenizer": type(tokenizer).__qualname__,
        "context_length": getattr(tokenizer, "context_length", None),
        "classnames": list(classnames),
        "templates": list(templates),
    }
    digest.update(json.dumps(header, ensure_ascii=False).encode("utf-8"))
    for name, tensor in model.state_dict().items():
        # The image tower and the logit scale do not affect W.
        if name.startswith("visual.") or name in ("logit_scale", "logit_bias"):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return digest.hexdigest()


def _read_cache(path: Path, key: str, num_classes: int) -> Tensor | None:
    if not path.is_file():
        return None
    try:
        tensors, meta = load_tensors(path)
    except CheckpointError as exc:
        logger.warning("ignoring unreadable zero-shot cache entry (%s); recomputing", exc)
        return None
    weight = tensors.get("weight")
    if meta.get("key") != key or weight is None or weight.dim() != 2 or weight.shape[0] != num_classes:
        logger.warning("zero-shot cache entry %s does not match this request; recomputing", path)
        return None
    return weight


def _write_cache(path: Path, key: str, weights: Tensor, num_templates: int) -> None:
    meta = {"key": key, "format": _CACHE_FORMAT, "num_templates": str(num_templates)}
    try:
        save_tensors(path, {"weight": weights}, meta)
    except OSError as exc:
        # A read-only or full cache folder must not stop a run; it only costs time.
        logger.warning("could not write zero-shot cache %s: %s", path, exc)
