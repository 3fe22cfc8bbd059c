"""The project's error types.

Every mistake a user can make (a bad config value, a missing file, a wrong dataset layout,
a foreign checkpoint) raises a :class:`RobustFTError` whose message names the bad value and
the valid choices or the fix. The CLI prints that message on one line and exits with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "RobustFTError",
    "ConfigError",
    "DataError",
    "ModelError",
    "CheckpointError",
    "TrainingError",
    "closest",
    "choices_hint",
]


class RobustFTError(ValueError):
    """Base class of every user-facing error raised by robustft."""


class ConfigError(RobustFTError):
    """A config key, value, preset or command-line option is invalid."""


class DataError(RobustFTError):
    """A dataset root, layout, image or class list is missing or malformed."""


class ModelError(RobustFTError):
    """A model name, weights file or architecture does not fit the request."""


class CheckpointError(RobustFTError):
    """A run folder or checkpoint file is missing, truncated, foreign or incompatible."""


class TrainingError(RobustFTError):
    """Training cannot continue (for example a non-finite loss)."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` entries of ``choices`` that look like ``name`` (best first)."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not found:
        lowered = name.lower()
        found = [c for c in choices if lowered and (lowered in c.lower() or c.lower() in lowered)][:n]
    return found


def choices_hint(name: str, choices: Iterable[str], limit: int = 20) -> str:
    """Format a 'did you mean' / 'valid choices' suffix for an error message."""
    choices = sorted(choices)
    near = closest(name, choices)
    parts = []
    if near:
        parts.append("did you mean " + " or ".join(repr(c) for c in near) + "?")
    shown = ", ".join(choices[:limit]) + (f", ... ({len(choices)} in all)" if len(choices) > limit else "")
    parts.append(f"valid: {shown}")
    return "; ".join(parts)
