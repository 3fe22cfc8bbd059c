"""Where a result came from: the git commit of the robustft source tree.

Read once per process from ``.git`` (no subprocess), and recorded in run folders,
classifier files, checkpoints and results rows.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["git_sha"]


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit the package runs from, read from .git without running git."""
    for folder in Path(__file__).resolve().parents:
        head = folder / ".git" / "HEAD"
        if head.is_file():
            try:
                ref = head.read_text().strip()
                if not ref.startswith("ref: "):
                    return ref or None
                target = folder / ".git" / ref[5:]
                if target.is_file():
                    return target.read_text().strip() or None
                packed = folder / ".git" / "packed-refs"
                for line in packed.read_text().splitlines() if packed.is_file() else []:
                    if line.endswith(" " + ref[5:]):
                        return line.split(" ", 1)[0]
            except OSError:
                return None
            return None
    return None
