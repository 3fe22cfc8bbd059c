"""Logging set-up: one call by the CLI, rank-0 console plus an optional per-run file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["setup_logging", "add_file_handler"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int | str = logging.INFO, *, rank: int = 0) -> None:
    """Configure the root logger: INFO to stderr on rank 0, WARNING elsewhere."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_robustft", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler._robustft = True  # type: ignore[attr-defined]
    handler.addFilter(_drop_open_clip_info)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    # Third-party libraries are chatty at INFO (matplotlib font cache, filelock).
    for name in ("matplotlib", "PIL", "filelock", "urllib3", "httpx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _drop_open_clip_info(record: logging.LogRecord) -> bool:
    # open_clip logs its model-building steps at INFO through the root logger, so they
    # cannot be silenced by logger name; keep its warnings, drop the step-by-step notes.
    return record.levelno >= logging.WARNING or "open_clip" not in record.pathname


def add_file_handler(path: str | Path) -> logging.Handler:
    """Also write every log record to ``path`` (the run's log file); returns the handler."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._robustft = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return handler
