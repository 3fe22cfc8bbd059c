"""``zeroshot``: the zero-shot CLIP classifier itself, evaluated without any training."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from robustft.methods.base import Method, register_method

__all__ = ["ZeroShot"]

logger = logging.getLogger(__name__)


@register_method("zeroshot", "zero-shot CLIP classifier (class-prompt head); evaluation only, no training")
class ZeroShot(Method):
    """Evaluation only: ``trains`` is False and :meth:`stages` is empty, so nothing is fitted.

    ``forward`` still scores a batch (without autograd), which is handy for validation.
    """

    trains = False

    def configure_trainable(self) -> None:
        self.student.requires_grad_(False)

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        return []

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Clean logits and cross-entropy of the zero-shot classifier, without autograd."""
        with torch.no_grad():
            logits = self.student(batch["image"])
            loss = self.task_term(logits, batch["label"])
        return {"loss": loss, "logits": logits, "loss_task": loss}
