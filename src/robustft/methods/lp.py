"""``lp``: linear probe. The image encoder is frozen; only the classification head trains."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from robustft.methods.base import Method, register_method

__all__ = ["LinearProbe"]

logger = logging.getLogger(__name__)


@register_method("lp", "linear probe: image encoder frozen, only the zero-shot-initialised head trains")
class LinearProbe(Method):
    """Cross-entropy through the head on features of the frozen encoder.

    The encoder runs without autograd (nothing below the head needs gradients), so a step
    costs one forward. ``param_groups`` holds the head's weight and bias only.
    """

    probe = True

    def configure_trainable(self) -> None:
        self.student.requires_grad_(False)
        self.student.head.requires_grad_(True)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            features = self.student.forward_features(batch["image"]).features
        logits = self.student_call("forward_head", features)
        loss = self.task_term(logits, batch["label"])
        return {"loss": loss, "logits": logits, "loss_task": loss.detach()}
