"""Evaluation suites: the in-distribution set, the shift sets and the metric each benchmark reports.

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
SUITES.add("wilds-iwildcam", Suite(
    "wilds-iwildcam", "iwildcam-id_test", ("iwildcam-test",), ("iwildcam-id_val", "iwildcam-val"),
    description="WILDS iWildCam v2.0: ID and OOD test macro-F1 (the papers' columns), validation splits listed"))
SUITES.add("wilds-fmow", Suite(
    "wilds-fmow", "fmow-id_test", ("fmow-test",), ("fmow-id_val", "fmow-val"),
    description="WILDS FMoW v1.1: ID test accuracy and OOD test worst-region accuracy, validation splits listed"))
SUITES.add("domainnet", Suite(
    "domainnet", "domainnet-real", ("domainnet-clipart", "domainnet-infograph", "domainnet-painting",
                                    "domainnet-sketch"),
    description="DomainNet trained on real: real test (ID), clipart, infograph, painting, sketch test (top-1)"))
SUITES.add("domainnet-all", Suite(
    "domainnet-all", "domainnet-real", ("domainnet-clipart", "domainnet-infograph", "domainnet-painting",
                                        "domainnet-quickdraw", "domainnet-sketch"),
    description="DomainNet trained on real, all five other domains (quickdraw included) (top-1)"))


def suite_of(datasets: set[str] | list[str] | tuple[str, ...]) -> Suite | None:
    """The registered suite whose ID set and shift sets are all among ``datasets`` (the largest such), if any."""
    present = set(datasets)
    fits = [SUITES.get(n) for n in SUITES.names()
            if SUITES.get(n).id in present and set(SUITES.get(n).shifts) <= present]
    return max(fits, key=lambda s: len(s.shifts), default=None)
