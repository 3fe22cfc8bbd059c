"""``kd``: fine-tuning plus knowledge distillation from the zero-shot logits on clean images."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from robustft.methods.base import Method, kd_loss, register_method

__all__ = ["KnowledgeDistillation"]

logger = logging.getLogger(__name__)


@register_method("kd", "FT + KD: cross-entropy + T^2 * KL to the frozen zero-shot logits at temperature T, "
                       "clean images")
class KnowledgeDistillation(Method):
    """``L = w_task * CE(s(x), y) + w_dist * T^2 * KL(softmax(t(x)/T) || softmax(s(x)/T))`` (batchmean).

    One student pass gives the logits of both terms; the teacher runs without autograd.
    """

    needs_teacher = True

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        images, opts = batch["image"], self.options
        logits = self.student_call("forward", images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        loss_task = self.task_term(logits, batch["label"])
        loss_dist = kd_loss(logits, teacher_logits, opts.temperature)
        loss = opts.task_weight * loss_task + opts.distill_weight * loss_dist
        return {"loss": loss, "logits": logits, "loss_task": loss_task.detach(), "loss_dist": loss_dist.detach()}
