"""Training checkpoints in a run folder: atomic, pruned, verified on load, never unpickled.

Layout::

    RUN/checkpoints/step_00001200/model.safetensors      trainable module's state_dict
                                  optimizer.safetensors  optimizer tensors, "state.<param index>.<key>"
                                  state.json             step, epoch, schedule, optimizer groups,
                                                         per-rank RNG states, best metric, config,
                                                         versions, git SHA
    RUN/checkpoints/latest                               name of the newest complete checkpoint
    RUN/best/model.safetensors + meta.json               weights of the best validation epoch

A checkpoint folder is written under a temporary name and renamed into place only when
every file in it is complete and fsynced, so a crash, ``kill -9`` or full disk can leave
at most a stray temporary folder, never a half-written checkpoint under a real name. The
newest ``keep_last`` checkpoints are kept. Loading tries the newest first and falls back to
older ones (with a warning) when a file is truncated or malformed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.engine.state import from_jsonable, to_jsonable
from robustft.errors import CheckpointError, RobustFTError
from robustft.safeio import (
    atomic_write_bytes,
    atomic_write_text,
    fsync_dir,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainingCheckpoint",
    "checkpoint_root",
    "best_dir",
    "check_writable",
    "list_checkpoints",
    "refuse_existing_checkpoints",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest",
    "save_best",
    "load_best",
    "remove_stale_temporaries",
    "flatten_optimizer_state",
    "unflatten_optimizer_state",
    "load_module_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "robustft-train-checkpoint"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
PathLike = str | os.PathLike[str]


@dataclass
class TrainingCheckpoint:
    """One checkpoint read back from disk (nothing applied to any module yet).

    Attributes:
        path: The ``step_XXXXXXXX`` folder.
        step: Optimizer steps completed when it was written.
        model: The trainable module's state dict.
        optimizer: The optimizer's ``state_dict`` rebuilt from safetensors + JSON.
        state: The rest of ``state.json`` (tensors inside it decoded).
    """

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def checkpoint_root(run_dir: PathLike) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def best_dir(run_dir: PathLike) -> Path:
    """``RUN/best``: the weights of the best validation epoch."""
    return Path(run_dir) / "best"


def check_writable(run_dir: PathLike, need_bytes: int = 0) -> None:
    """Fail before training if checkpoints cannot be written to ``run_dir``.

    Args:
        run_dir: The run folder (created if missing).
        need_bytes: Estimated size of one checkpoint; less free space than this is an error.

    Raises:
        CheckpointError: The folder cannot be created or written, or the disk is too full.
    """
    folder = checkpoint_root(run_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        atomic_write_bytes(probe, b"robustft write probe\n")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoints to {folder}: {exc.strerror or exc}; choose a writable output folder (--out)"
        ) from None
    free = shutil.disk_usage(folder).free
    if need_bytes > 0 and free < need_bytes:
        raise CheckpointError(
            f"{folder} has {free / 2**30:.2f} GiB free but one checkpoint needs about "
            f"{need_bytes / 2**30:.2f} GiB; free some space or choose another output folder (--out)"
        )


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Complete-looking checkpoint folders of the run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def refuse_existing_checkpoints(run_dir: PathLike) -> None:
    """Refuse to start a run afresh in ``run_dir`` when it holds checkpoints (read-only).

    Raises:
        CheckpointError: ``run_dir`` holds checkpoints; the message names the newest and
            the fix (``--resume``, or a new output folder).
    """
    existing = list_checkpoints(run_dir)
    if existing:
        raise CheckpointError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}); "
                              "pass --resume to continue that run, or choose a new output folder")


def remove_stale_temporaries(run_dir: PathLike) -> None:
    """Clean up after writers that died mid-write.

    Half-written ``.tmp-*`` folders are deleted. An ``.old-NAME-PID`` folder is the previous
    version of ``NAME`` moved aside just before the new one was renamed in; if the writer
    died between the two renames it is the only copy, so it is moved back.
    """
    for root in (checkpoint_root(run_dir), Path(run_dir)):
        if not root.is_dir():
            continue
        for path in root.iterdir():
            if not path.is_dir():
                continue
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith(".old-"):
                original = root / path.name[len(".old-") :].rsplit("-", 1)[0]
                if original.exists():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.replace(path, original)


def _write_folder_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder, then rename it to ``final``."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fsync_dir(tmp)
        if final.exists():
            os.replace(final, old)  # a folder cannot be renamed over a non-empty one
        try:
            os.replace(tmp, final)
        except BaseException:
            if old.exists() and not final.exists():
                os.replace(old, final)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into named tensors and a JSON-safe rest.

    Returns:
        ``(tensors, meta)``: tensors named ``state.<param index>.<key>`` (``exp_avg``,
        ``exp_avg_sq``, ``step`` for AdamW); meta holds ``param_groups`` and any non-tensor
        per-parameter state.
    """
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{int(index)}.{key}"] = value
            else:
                other.setdefault(str(int(index)), {})[key] = value
    return tensors, {"param_groups": to_jsonable(state_dict["param_groups"]), "state": to_jsonable(other)}


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`; raises CheckpointError on foreign names."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise CheckpointError(f"unexpected tensor {name!r} in optimizer.safetensors")
        state.setdefault(int(parts[1]), {})[parts[2]] = value
    for index, entry in dict(meta.get("state", {})).items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: PathLike,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    state: Mapping[str, Any],
    *,
    keep_last: int = 3,
) -> Path:
    """Write ``RUN/checkpoints/step_<step>/`` atomically, update ``latest``, prune old ones.

    Args:
        run_dir: The run folder.
        step: Optimizer steps completed.
        model_state: The trainable module's ``state_dict()``.
        optimizer_state: The optimizer's ``state_dict()``.
        state: Everything else (JSON-safe after :func:`~robustft.engine.state.to_jsonable`).
        keep_last: How many of the newest checkpoints to keep (>= 1).

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: The write failed (disk full, permissions); existing checkpoints
            are untouched.
    """
    final = checkpoint_root(run_dir) / f"step_{step:08d}"
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer_state)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": 1, **to_jsonable(dict(state))}
    payload.update(step=int(step), optimizer=opt_meta)

    def write(folder: Path) -> None:
        save_tensors(folder / "model.safetensors", model_state, {"format": CHECKPOINT_FORMAT})
        save_tensors(folder / "optimizer.safetensors", opt_tensors, {"format": CHECKPOINT_FORMAT})
        write_json(folder / "state.json", payload)

    try:
        _write_folder_atomically(final, write)
        atomic_write_text(checkpoint_root(run_dir) / "latest", final.name + "\n")
    except OSError as exc:
        kept = [p.name for p in list_checkpoints(run_dir) if p != final]
        raise CheckpointError(
            f"could not write checkpoint {final}: {exc.strerror or exc}; "
            f"kept {', '.join(kept[-1:]) or 'no earlier checkpoint'} (free disk space, then resume)"
        ) from exc
    _prune(run_dir, keep_last, final)
    return final


def _prune(run_dir: PathLike, keep_last: int, newest: Path) -> None:
    existing = list_checkpoints(run_dir)
    for path in existing[: max(0, len(existing) - max(1, keep_last))]:
        if path != newest:
            shutil.rmtree(path, ignore_errors=True)


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint folder (expected a name like step_00000100)")
    return int(match.group(1))


def load_checkpoint(path: PathLike, device: str | torch.device = "cpu") -> TrainingCheckpoint:
    """Read and verify one checkpoint folder.

    Raises:
        CheckpointError: A file is missing, truncated, malformed or from another program.
    """
    path = Path(path)
    step = _step_of(path)
    raw = read_json(path / "state.json")
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path / 'state.json'} is not a robustft training checkpoint")
    if raw.get("step") != step:
        raise CheckpointError(f"{path / 'state.json'} says step {raw.get('step')!r} but the folder is step {step}")
    model, _ = load_tensors(path / "model.safetensors", device=device)
    opt_tensors, _ = load_tensors(path / "optimizer.safetensors", device=device)
    try:
        optimizer = unflatten_optimizer_state(opt_tensors, raw["optimizer"])
        state = from_jsonable({k: v for k, v in raw.items() if k != "optimizer"})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path / 'state.json'} is malformed: {exc!r}") from None
    return TrainingCheckpoint(path=path, step=step, model=model, optimizer=optimizer, state=state)


def load_latest(run_dir: PathLike, device: str | torch.device = "cpu") -> TrainingCheckpoint | None:
    """The newest readable checkpoint of the run, falling back past corrupt ones.

    Returns:
        ``None`` when the run has no checkpoint folder at all.

    Raises:
        CheckpointError: Checkpoints exist but none of them can be read.
    """
    candidates = list_checkpoints(run_dir)
    problems = []
    for path in reversed(candidates):
        try:
            return load_checkpoint(path, device=device)
        except RobustFTError as exc:
            problems.append(f"{path.name}: {exc}")
            logger.warning("checkpoint %s is unreadable, falling back to the previous one: %s", path, exc)
    if problems:
        raise CheckpointError(f"no readable checkpoint in {checkpoint_root(run_dir)}: " + "; ".join(problems))
    return None


def save_best(run_dir: PathLike, model_state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``RUN/best/`` (model weights + ``meta.json``) atomically, replacing the previous best."""
    final = best_dir(run_dir)

    def write(folder: Path) -> None:
        save_tensors(folder / "model.safetensors", model_state, {"format": "robustft-best-weights"})
        write_json(folder / "meta.json", to_jsonable(dict(meta)))

    try:
        _write_folder_atomically(final, write)
    except OSError as exc:
        raise CheckpointError(f"could not write {final}: {exc.strerror or exc}; the previous best is kept") from exc
    return final


def load_best(
    run_dir: PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(weights, meta)`` of ``RUN/best/``, or ``None`` when the run has none."""
    folder = best_dir(run_dir)
    if not folder.is_dir():
        return None
    tensors, _ = load_tensors(folder / "model.safetensors", device=device)
    return tensors, read_json(folder / "meta.json")


def load_module_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``tensors`` into ``module`` after checking every name, shape and dtype.

    Raises:
        CheckpointError: Listing missing, unexpected and mismatched entries (the checkpoint
            belongs to another model or method).
    """
    expected = module.state_dict()
    problems = [f"missing {name}" for name in expected if name not in tensors]
    problems += [f"unexpected {name}" for name in tensors if name not in expected]
    for name, ref in expected.items():
        got = tensors.get(name)
        if got is not None and (got.shape != ref.shape or got.dtype != ref.dtype):
            problems.append(
                f"{name}: {tuple(got.shape)} {got.dtype} in {source}, model has {tuple(ref.shape)} {ref.dtype}"
            )
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... ({len(problems)} in all)" if len(problems) > 12 else "")
        raise CheckpointError(f"{source} does not match the model: {shown}")
    module.load_state_dict(dict(tensors), strict=True)
