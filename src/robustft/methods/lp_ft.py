"""``lp-ft``: linear probe first, then end-to-end fine-tuning from the probed head.

The method is a sequence of two registered stages, ``["lp", "ft"]``; the pipeline builds
and fits each stage by name on the same student, so this file imports neither.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import Tensor

from robustft.errors import TrainingError
from robustft.methods.base import Method, register_method

__all__ = ["LpFt"]

logger = logging.getLogger(__name__)


@register_method("lp-ft", "LP-FT: linear probe (stage 'lp'), then full fine-tuning from the probed head (stage 'ft')")
class LpFt(Method):
    """A two-stage method; it is never trained itself, only its :meth:`stages` are."""

    @classmethod
    def stages(cls) -> list[str]:
        return ["lp", "ft"]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise TrainingError("lp-ft is trained stage by stage: build and fit each name of stages() "
                            "(['lp', 'ft']) with build_method on the same student")
