"""Crash-safe file writes and the two on-disk formats robustft uses: safetensors and JSON.

Every write goes to a temporary file in the destination folder, is flushed and fsynced,
then renamed over the destination with ``os.replace``, so a reader sees either the old
file or the new one, never half of one (a killed job leaves no truncated checkpoint).
Reads never unpickle anything: tensors come from safetensors, metadata from JSON, and a
file that is neither raises :class:`robustft.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save

from robustft.errors import CheckpointError

__all__ = [
    "atomic_write_bytes",
    "fsync_dir",
    "atomic_write_text",
    "save_tensors",
    "load_tensors",
    "write_json",
    "read_json",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders as needed.

    Args:
        path: Destination file; replaced in one step if it exists.
        data: The complete file content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Leave no stray temporary file behind, whatever interrupted the write.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode(encoding))


def save_tensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save named tensors as one safetensors file, atomically.

    Args:
        path: Destination ``.safetensors`` file.
        tensors: Name -> tensor. Tensors are moved to CPU and made contiguous; tensors that
            share memory are copied so that safetensors accepts them.
        metadata: Optional string -> string header entries (safetensors allows strings only).
    """
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad}")
    prepared: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storage and tensor.numel() > 0:
            # safetensors refuses tensors that share memory (tied weights); store a copy.
            tensor = tensor.clone()
        seen_storage.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    data = _st_save(prepared, metadata=dict(metadata) if metadata is not None else None)
    atomic_write_bytes(path, data)


def load_tensors(path: PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file written by :func:`save_tensors` (or any safetensors file).

    Args:
        path: The ``.safetensors`` file.
        device: Where to put the loaded tensors.

    Returns:
        ``(tensors, metadata)``; metadata is ``{}`` when the file has none.

    Raises:
        CheckpointError: The file is missing, unreadable, truncated, or not safetensors
            (for example a pickle or a foreign format).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tensor file not found: {path}")
    try:
        # safe_open memory-maps the file, so a multi-GB checkpoint is not read twice.
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated, corrupted or another format): {exc}"
        ) from None
    return tensors, metadata


def write_json(path: PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` as pretty, key-sorted UTF-8 JSON, atomically.

    Raises:
        TypeError: ``obj`` holds something JSON cannot represent (a programming error).
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def read_json(path: PathLike) -> Any:
    """Read a JSON file.

    Raises:
        CheckpointError: The file is missing, unreadable or not valid UTF-8 JSON.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"JSON file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read JSON file {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from None
