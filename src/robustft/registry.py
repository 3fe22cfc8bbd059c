"""Name -> object registries for everything pluggable (methods, datasets, prompt sets).

A registry refuses duplicate names, lists its names, and answers an unknown name with the
valid names and the closest match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from robustft.errors import RobustFTError, choices_hint

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """A named collection of objects of one kind.

    Args:
        kind: What the entries are ("method", "dataset", ...); used in error messages.
        error: The error class raised for unknown names.
    """

    def __init__(self, kind: str, error: type[RobustFTError] = RobustFTError) -> None:
        self.kind = kind
        self._error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds the decorated object under ``name``."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Add ``obj`` under ``name``; a name can be registered once only."""
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def set_factory(self, factory: Callable[[str], T | None]) -> None:
        """Build entries on demand: ``factory(name)`` is asked for a name not registered (None: unknown).

        What it returns should be :meth:`add`-ed by the factory itself, so it is built once.
        """
        self._factory = factory

    def get(self, name: str) -> T:
        """Return the entry called ``name``, or raise an error listing the valid names."""
        try:
            return self._entries[name]
        except KeyError:
            factory = getattr(self, "_factory", None)
            made = factory(name) if factory is not None else None
            if made is not None:
                return made
            raise self._error(f"unknown {self.kind} {name!r}; {choices_hint(name, self._entries)}") from None

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
