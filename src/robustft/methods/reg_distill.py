"""Regularisers ``fd`` and ``kd``: distillation to the frozen zero-shot model on clean images.

``fd``: ``MSE(f_s(x), stopgrad f_t(x))`` on the projected image features (not normalised),
mean over batch and feature dimensions. ``kd``: ``T^2 * KL(softmax(t(x)/T) || softmax(s(x)/T))``
(batchmean) at ``method.temperature``. Both reuse the student's clean pass of the task
objective; the teacher runs without autograd. Weight: ``method.distill_weight``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustft.methods.base import MethodOptions, feature_loss, kd_loss
from robustft.methods.objective import Needs, Regulariser, Step, register_regulariser

__all__ = ["FeatureDistill", "LogitDistill"]


@register_regulariser
class FeatureDistill(Regulariser):
    """MSE to the frozen zero-shot encoder's features on the clean images."""

    key = "fd"
    log_name = "loss_dist"
    description = "MSE to the frozen zero-shot image features, clean images"

    @classmethod
    def needs(cls, options: MethodOptions, owner: str = "") -> Needs:
        return Needs(teacher=True)

    def prepare(self, step: Step) -> None:
        step.want_features = True

    def forward(self, step: Step) -> Tensor:
        with torch.no_grad():
            target = self.method.frozen.forward_features(step.images).features
        if step.features is None:
            raise RuntimeError("fd: the task objective returned no features")
        return feature_loss(step.features, target)


@register_regulariser
class LogitDistill(Regulariser):
    """Temperature-scaled KL to the frozen zero-shot logits on the clean images."""

    key = "kd"
    log_name = "loss_dist"
    description = "T^2 * KL to the frozen zero-shot logits at temperature T, clean images"

    @classmethod
    def needs(cls, options: MethodOptions, owner: str = "") -> Needs:
        return Needs(teacher=True)

    def forward(self, step: Step) -> Tensor:
        with torch.no_grad():
            target = self.method.frozen(step.images)
        return kd_loss(step.clean_logits(), target, self.options.temperature)
