"""``ft``: end-to-end fine-tuning with cross-entropy on clean images."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from torch import Tensor

from robustft.methods.base import Method, register_method

__all__ = ["FineTune"]

logger = logging.getLogger(__name__)


@register_method("ft", "end-to-end fine-tuning: cross-entropy on clean images, every weight trains")
class FineTune(Method):
    """``L = CE(head(f_s(x)), y)`` (with the run's label smoothing)."""

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logits = self.student_call("forward", batch["image"])
        loss = self.task_term(logits, batch["label"])
        return {"loss": loss, "logits": logits, "loss_task": loss.detach()}
