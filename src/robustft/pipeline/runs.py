"""Run folders: creating them safely, recognising them, and refusing to clobber them.

A run folder holds ``run.json`` (what kind of run, which config hash, when, which
versions), ``config.yaml`` (the resolved config, for training runs) and whatever the run
wrote (classifier, checkpoints, logs). Writing into a folder that already holds a
*different* run is refused unless the user passes ``--overwrite``; the same run may be
re-entered (``--resume``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from robustft import __version__
from robustft.provenance import git_sha
from robustft.config import RunConfig, list_presets
from robustft.errors import CheckpointError, ConfigError
from robustft.safeio import read_json, write_json

__all__ = ["RUN_FILE", "git_sha", "versions", "check_run_dir", "prepare_run_dir", "read_run_info",
           "check_writable", "run_label", "classifier_folder", "wise_alphas", "wise_folder", "run_of_classifier",
           "WISE_DIR"]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


def versions() -> dict[str, str]:
    """Versions of the libraries that determine a run's numbers."""
    import open_clip

    return {
        "robustft": __version__,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "python": platform.python_version(),
    }


def check_writable(folder: Path) -> None:
    """Fail early (before any work) when ``folder`` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output folder {str(folder)!r} is not writable ({err.strerror}); choose another --out") from None


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run.json`` of a run folder; a clear error when it is not a run."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {str(run_dir)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(run_dir)!r} is not a robustft run folder (no {RUN_FILE}); give the --out of a robustft command")
    info = read_json(path)
    if not isinstance(info, dict) or "kind" not in info:
        raise CheckpointError(f"{str(path)!r} is not a robustft run description")
    return info


def check_run_dir(out: str | Path, *, kind: str, identity: str, overwrite: bool = False,
                  resume: bool = False) -> bool:
    """The refusals of :func:`prepare_run_dir`, without writing or deleting anything.

    Call it before any expensive work (loading a model), so that a bad ``--out`` fails at once.

    Returns:
        True when ``out`` holds this run and is re-entered as it is (a resume, or the same
        kind and identity); False when it is new, empty, or will be cleared by ``overwrite``.

    Raises:
        ConfigError: See :func:`prepare_run_dir`.
    """
    out = Path(out)
    existing = out / RUN_FILE
    if resume:
        if not existing.is_file():
            raise ConfigError(f"--resume: {str(out)!r} holds no run to resume; run without --resume first")
        info = read_run_info(out)
        if info.get("kind") != kind:
            raise ConfigError(f"--resume: {str(out)!r} holds a {info.get('kind')} run, not a {kind} run; "
                              "give the --out of the interrupted run")
        if info.get("identity") != identity:
            raise ConfigError(
                f"--resume: {str(out)!r} was started with a different config (hash {info.get('identity')}, now {identity}); "
                "resume with the same --config/--set values, or choose another --out"
            )
        return True
    if out.exists() and any(out.iterdir()):
        same = existing.is_file() and _same_run(out, kind, identity)
        if not same and not overwrite:
            what = "a different robustft run" if existing.is_file() else "files that are not a robustft run"
            raise ConfigError(f"output folder {str(out)!r} already holds {what}; choose another --out or pass --overwrite")
        return same
    return False


def prepare_run_dir(
    out: str | Path, *, kind: str, identity: str, overwrite: bool = False, resume: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Create or re-enter the run folder ``out`` for a run of ``kind``.

    Args:
        out: The run folder.
        kind: "zeroshot", "train", "wise", "demo", ...
        identity: A hash of what makes this run (its config); an existing run with the same
            kind and identity is re-entered, a different one is refused unless ``overwrite``.
        overwrite: Delete a different run found in ``out``.
        resume: The caller will resume; the folder must already hold this run.
        extra: More fields for ``run.json``.
    """
    out = Path(out)
    kept = check_run_dir(out, kind=kind, identity=identity, overwrite=overwrite, resume=resume)
    if resume:
        return out
    if not kept and out.exists() and any(out.iterdir()):
        logger.warning("--overwrite: removing the previous contents of %s", out)
        shutil.rmtree(out)
    check_writable(out)
    info = {
        "kind": kind,
        "identity": identity,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "git_sha": git_sha(),
        **(extra or {}),
    }
    write_json(out / RUN_FILE, info)
    return out


def _same_run(out: Path, kind: str, identity: str) -> bool:
    try:
        info = read_run_info(out)
    except CheckpointError:
        return False
    return info.get("kind") == kind and info.get("identity") == identity


def run_label(config_name: str | None, folder: str | Path) -> str:
    """The ``run`` field of a run's results rows (``train``, ``eval --run`` and ``wise`` all use it).

    The config's ``name`` when the user chose one; the run folder's name when ``name`` is
    the default (``run``) or the name of a shipped preset, which every run of that preset
    inherits (so that two runs of one preset never share a ``run``).
    """
    if config_name and config_name != RunConfig().name and config_name not in list_presets():
        return config_name
    return Path(folder).resolve().name


WISE_DIR = "wise"  # a run's interpolated classifiers: RUN/wise/alpha_X.XX/


def wise_folder(run_dir: str | Path, alpha: float) -> Path:
    """Where a run keeps its WiSE-FT classifier at ``alpha``: ``RUN/wise/alpha_X.XX``."""
    return Path(run_dir) / WISE_DIR / f"alpha_{alpha:.2f}"


def run_of_classifier(folder: str | Path) -> Path:
    """The run folder of an interpolated classifier's folder (``RUN/wise/alpha_X.XX`` -> ``RUN``).

    A folder written by ``robustft wise --save DIR`` (``DIR/alpha_X.XX``) belongs to ``DIR``.
    """
    parent = Path(folder).parent
    return parent.parent if parent.name == WISE_DIR else parent


def wise_alphas(run_dir: str | Path) -> dict[float, Path]:
    """The WiSE-FT classifiers a run folder holds: ``{alpha: RUN/wise/alpha_X.XX}``, by alpha."""
    found: dict[float, Path] = {}
    wise = Path(run_dir) / WISE_DIR
    if wise.is_dir():
        for path in wise.iterdir():
            if path.name.startswith("alpha_") and (path / "classifier.json").is_file():
                try:
                    found[float(path.name[len("alpha_"):])] = path
                except ValueError:
                    continue
    return dict(sorted(found.items()))


def classifier_folder(run: str | Path, alpha: float | None = None) -> Path:
    """The folder of the classifier to evaluate: ``run`` itself, or its WiSE-FT ``alpha``'s.

    Raises:
        CheckpointError: ``alpha`` is not one of the run's WiSE-FT alphas (the message lists
            them), or ``run`` holds interpolated classifiers only and no alpha was named.
    """
    run = Path(run)
    alphas = wise_alphas(run)
    listing = ", ".join(f"{a:.2f}" for a in alphas)
    if alpha is None:
        if alphas and not (run / "classifier.json").is_file():
            raise CheckpointError(f"{run} holds WiSE-FT classifiers only (alphas {listing}); choose one with --alpha A")
        return run
    if not run.is_dir():
        raise CheckpointError(f"classifier run not found: {run}")
    for value, path in alphas.items():
        if math.isclose(value, alpha, abs_tol=1e-6):
            return path
    if alphas:
        raise CheckpointError(f"--alpha {alpha:g}: {run} has no WiSE-FT classifier for it; available alphas: {listing}")
    raise CheckpointError(f"--alpha {alpha:g}: {run} holds no WiSE-FT classifiers (wise/alpha_X.XX/, written by "
                          "wise-ft runs); evaluate it without --alpha")
