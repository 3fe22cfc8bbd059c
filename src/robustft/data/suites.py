"""Evaluation suites: the in-distribution set, the shift sets and the metric each benchmark reports.

Only suites whose sets are all registered are listed (``imagenet-shifts`` today; the WILDS and
DomainNet suites join with their loaders).

A suite names what one benchmark table of the literature holds: the ID test set, the
distribution-shift sets whose headline metric is averaged into "OOD avg", and further sets
that are evaluated and listed but not averaged (WILDS' validation splits). The headline
metric of each set comes from its :class:`~robustft.data.datasets.EvalSet`
(``headline``): top-1 accuracy for ImageNet, macro-F1 for iWildCam, worst-region accuracy
for FMoW's OOD test split. An average never mixes metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustft.errors import ConfigError
from robustft.registry import Registry

__all__ = ["Suite", "SUITES", "suite_of"]


@dataclass(frozen=True)
class Suite:
    """One benchmark's evaluation sets.

    Attributes:
        name: The suite's name (``--suite NAME``).
        id: The in-distribution test set.
        shifts: The distribution-shift sets averaged into "OOD avg", in the literature's column order.
        also: Sets evaluated with the suite but neither ID nor averaged (validation splits).
        description: One line for help texts and docs.
    """

    name: str
    id: str
    shifts: tuple[str, ...]
    also: tuple[str, ...] = ()
    description: str = ""

    @property
    def sets(self) -> tuple[str, ...]:
        """Every set the suite evaluates: the ID set, then the shifts, then the others."""
        return (self.id, *self.shifts, *self.also)


SUITES: Registry[Suite] = Registry("suite", ConfigError)

SUITES.add("imagenet-shifts", Suite(
    "imagenet-shifts", "imagenet",
    ("imagenet-v2", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a"),
    description="ImageNet and its five shifts (top-1)"))


def suite_of(datasets: set[str] | list[str] | tuple[str, ...]) -> Suite | None:
    """The registered suite whose ID set and shift sets are all among ``datasets`` (the largest such), if any."""
    present = set(datasets)
    suites = (SUITES.get(name) for name in SUITES.names())
    fits = [s for s in suites if s.id in present and set(s.shifts) <= present]
    return max(fits, key=lambda s: len(s.shifts), default=None)
