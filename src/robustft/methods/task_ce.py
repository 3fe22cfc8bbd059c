"""Task objective ``ce``: cross-entropy through the zero-shot-initialised head on clean images.

The student's clean pass is the only pass of the step that every term shares: it returns
the logits and, when a term asked (see :class:`robustft.methods.objective.Step`), the
features, the attention maps or ln_1 activations of a student CAM, and the outputs of extra
images (counterfactuals) run in the SAME pass over ``[x; x_extra]`` — a ViT treats every
image independently, so this is the arithmetic of separate passes with taller products.

``probe=True`` is the linear probe: the image tower runs without autograd and only the head
trains (one forward per step).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from robustft.methods.base import task_loss
from robustft.methods.objective import ComposedMethod, Step, TaskObjective, register_task

__all__ = ["CrossEntropyTask"]


@register_task
class CrossEntropyTask(TaskObjective):
    """``L_task = CE(head(f_s(x)), y)`` with the run's label smoothing."""

    key = "ce"
    description = "cross-entropy through the zero-shot head on clean images"

    def __init__(self, method: ComposedMethod, *, probe: bool = False) -> None:
        super().__init__(method)
        self.probe = probe

    def configure_trainable(self) -> None:
        if self.probe:
            self.method.student.requires_grad_(False)
            self.method.student.head.requires_grad_(True)

    def forward(self, step: Step) -> Tensor:
        m, images = self.method, step.images
        if self.probe:
            with torch.no_grad():
                features = m.student.forward_features(images).features
            step.logits = m.student_call("forward_head", features)
        elif step.extra:
            n = images.shape[0]
            logits, out = m.student_call("forward_with_features", torch.cat([images, *step.extra]))
            step.logits, step.features = logits[:n], out.features[:n]
            start = n
            for chunk in step.extra:
                stop = start + chunk.shape[0]
                step.extra_out.append((logits[start:stop], out.features[start:stop]))
                start = stop
        elif step.cam_kind is not None:
            # The student's CAM needs autograd even when the caller scores without it (validation).
            grad = torch.enable_grad() if not torch.is_grad_enabled() else contextlib.nullcontext()
            with grad:
                step.logits, step.clean = m.student_call("forward_with_features", images,
                                                         return_attn=step.cam_kind == "mmcam",
                                                         return_ln1=step.cam_kind == "gradcam")
            step.features = step.clean.features
        elif step.want_features:
            step.logits, out = m.student_call("forward_with_features", images)
            step.features = out.features
        else:
            step.logits = m.student_call("forward", images)
        return task_loss(step.logits, step.labels, self.options.label_smoothing)
