"""Model soups (Wortsman et al., 2022): average the weights of several fine-tuned runs.

Both soups average every weight, the classification head included, through
:func:`robustft.ops.weights.average_state_dicts` (via :func:`~robustft.ops.weights.blend_into`),
adding one ingredient at a time as a running mean, ``n/(n+1) * soup + 1/(n+1) * new``, so
that only the soup and one ingredient are in memory at once.

- **Uniform soup**: the mean of all ingredients.
- **Greedy soup**: the ingredients sorted by held-out accuracy, best first; the soup
  starts as the best one, with its held-out accuracy as ``best``; each next ingredient, in
  that order, is tried as the uniform mean of the ingredients kept so far plus it, and kept
  only if that candidate soup's held-out accuracy is strictly greater than ``best`` (which
  then becomes that accuracy). One pass, no revisits.

Ties in the sort keep the order the ingredients were given in (the first given goes
first). The reference implementation sorts ascending and reverses, which puts the *later*
one first among equal accuracies; list the ingredient you prefer first to get the same
soup as the reference would when it comes later.

The functions here never read files or data: the caller passes ``load(name) -> state
dict`` and ``score(module) -> held-out top-1``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from robustft.errors import ConfigError
from robustft.ops.weights import blend_into

__all__ = ["SoupCandidate", "SoupResult", "greedy_order", "greedy_soup", "uniform_soup"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)
State = Mapping[str, Any]


@dataclass(frozen=True)
class SoupCandidate:
    """One ingredient's line in a soup's selection log.

    Attributes:
        name: The ingredient (as the caller named it).
        holdout_top1: Its own held-out top-1 (None in a uniform soup, which measures nothing).
        soup_top1: Held-out top-1 of the candidate soup with it added (greedy soup; for the
            first ingredient its own accuracy), None where nothing was measured.
        kept: Whether it is in the soup.
    """

    name: str
    holdout_top1: float | None
    soup_top1: float | None
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.name, "holdout_top1": self.holdout_top1, "soup_top1": self.soup_top1, "kept": self.kept}


@dataclass
class SoupResult:
    """A soup and how it was made.

    Attributes:
        model: The soup (a copy of the template, eval mode, no gradients).
        candidates: Every ingredient, in the order it was tried (greedy: by held-out top-1).
        holdout_top1: The soup's held-out top-1 (greedy), None for a uniform soup.
    """

    model: nn.Module
    candidates: list[SoupCandidate] = field(default_factory=list)
    holdout_top1: float | None = None

    @property
    def ingredients(self) -> list[str]:
        """The names of the ingredients kept, in the order they were added."""
        return [c.name for c in self.candidates if c.kept]


def _check_names(names: Sequence[str], least: int) -> None:
    if len(names) < least:
        raise ConfigError(f"a soup needs at least {least} ingredients; got {len(names)}")
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"soup ingredient {name!r} is given twice; give each run once")
        seen.add(name)


def _add(template: M, soup: State, n: int, new: State) -> M:
    """The uniform mean of the ``n`` ingredients in ``soup`` and ``new``: n/(n+1) soup + 1/(n+1) new."""
    return blend_into(template, [soup, new], [n / (n + 1), 1 / (n + 1)])


def _state(module: nn.Module) -> dict[str, Any]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def uniform_soup(template: M, names: Sequence[str], load: Callable[[str], State]) -> SoupResult:
    """The mean of every ingredient's weights (head included), added one at a time.

    Args:
        template: A module of the ingredients' architecture (left unchanged).
        names: The ingredients, at least 2, each once.
        load: ``load(name)`` gives the ingredient's state dict.

    Raises:
        ConfigError: Fewer than 2 ingredients, or one given twice.
        CheckpointError: An ingredient's state dict does not fit the others.
    """
    _check_names(names, 2)
    soup = blend_into(template, [load(names[0])], [1.0])
    for n, name in enumerate(names[1:], start=1):
        soup = _add(template, _state(soup), n, load(name))
        logger.info("uniform soup: added %s (%d ingredients)", name, n + 1)
    return SoupResult(soup, [SoupCandidate(name, None, None, True) for name in names])


def greedy_order(names: Sequence[str], accuracies: Sequence[float]) -> list[int]:
    """Indices of ``names`` by held-out accuracy, best first; ties keep the given order."""
    if len(names) != len(accuracies):
        raise ConfigError(f"{len(accuracies)} held-out accuracies for {len(names)} ingredients")
    return sorted(range(len(names)), key=lambda i: -accuracies[i])  # sorted() is stable


def greedy_soup(template: M, names: Sequence[str], load: Callable[[str], State],
                score: Callable[[nn.Module], float]) -> SoupResult:
    """The greedy soup of ``names`` (see the module docstring for the rule).

    Each ingredient is scored on its own first (``len(names)`` calls of ``score``), then
    each candidate soup once (``len(names) - 1`` more).

    Args:
        template: A module of the ingredients' architecture (left unchanged).
        names: The ingredients, at least 2, each once.
        load: ``load(name)`` gives the ingredient's state dict (called about twice per name).
        score: Held-out top-1 of a module; higher is better.

    Raises:
        ConfigError: Fewer than 2 ingredients, or one given twice.
        CheckpointError: An ingredient's state dict does not fit the others.
    """
    _check_names(names, 2)
    accuracies = []
    for name in names:
        accuracies.append(float(score(blend_into(template, [load(name)], [1.0]))))
        logger.info("greedy soup: %s alone: held-out top-1 %.2f%%", name, accuracies[-1])
    order = greedy_order(names, accuracies)
    first = order[0]
    soup = blend_into(template, [load(names[first])], [1.0])
    best, n = accuracies[first], 1
    log = [SoupCandidate(names[first], accuracies[first], accuracies[first], True)]
    for i in order[1:]:
        candidate = _add(template, _state(soup), n, load(names[i]))
        acc = float(score(candidate))
        kept = acc > best  # strictly better than the soup so far
        logger.info("greedy soup: + %s -> held-out top-1 %.2f%% (soup so far %.2f%%): %s", names[i], acc, best,
                    "kept" if kept else "left out")
        if kept:
            soup, best, n = candidate, acc, n + 1
        log.append(SoupCandidate(names[i], accuracies[i], acc, kept))
        del candidate
    return SoupResult(soup, log, best)
