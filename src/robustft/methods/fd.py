"""``fd``: fine-tuning plus feature distillation from the zero-shot encoder on clean images."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from robustft.methods.base import Method, feature_loss, register_method

__all__ = ["FeatureDistillation"]

logger = logging.getLogger(__name__)


@register_method("fd", "FT + FD: cross-entropy + MSE to the frozen zero-shot image features, clean images")
class FeatureDistillation(Method):
    """``L = w_task * CE(head(f_s(x)), y) + w_dist * MSE(f_s(x), f_t(x))``.

    The student's logits and features come from ONE pass (the reference code runs the
    student twice on the clean batch); the teacher runs without autograd.
    """

    needs_teacher = True

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, opts = batch["image"], self.options
        logits, out = self.student_call("forward_with_features", images)
        with torch.no_grad():
            teacher_features = self.teacher.forward_features(images).features
        loss_task = self.task_term(logits, batch["label"])
        loss_dist = feature_loss(out.features, teacher_features)
        loss = opts.task_weight * loss_task + opts.distill_weight * loss_dist
        return {"loss": loss, "logits": logits, "loss_task": loss_task.detach(), "loss_dist": loss_dist.detach()}
