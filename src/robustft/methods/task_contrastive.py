"""Task objective ``contrastive``: FLYP's contrastive loss between images and class captions.

Each training row is an image and one template filled with its class name (rows drawn at
random from all (image, template) pairs: :mod:`robustft.data.captions`). Both towers and
CLIP's ``logit_scale`` train; the loss is CLIP's symmetric InfoNCE over the GLOBAL batch
(image and text features gathered from every process with their gradients, so N processes
compute what one process would), with same-class captions as negatives, as FLYP's reference
does (``method.multi_positive=true`` makes them positives). The classification head is not
trained: it is rebuilt from the current text tower (every template per class, CLIP's recipe)
before every held-out check and at the end, so the saved run is an image tower with its
zero-shot head, like every other run.

The trainable module is a :class:`TowerPair` (the student classifier and the text tower),
whose parameters all decay (the reference applies weight decay to every CLIP parameter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustft.distributed import all_gather_with_grad
from robustft.methods.base import MethodOptions
from robustft.methods.objective import ComposedMethod, Needs, Step, TaskObjective, register_task
from robustft.model.classifier import ImageClassifier
from robustft.model.text import TextTower, refresh_head
from robustft.ops.contrastive import clip_contrastive_loss

__all__ = ["ContrastiveTask", "TextSide", "TowerPair"]


@dataclass
class TextSide:
    """What a text-training task needs from the pipeline (``Needs.text_tower``).

    Attributes:
        tower: A trainable copy of CLIP's text tower (with ``logit_scale``).
        tokenizer: The model's tokenizer (``ClipBundle.tokenizer``).
        classnames: Class names in label order.
        templates: The prompt templates the head and the captions are built from.
    """

    tower: TextTower
    tokenizer: Callable[[list[str]], Tensor]
    classnames: Sequence[str]
    templates: Sequence[str]


class TowerPair(nn.Module):
    """The student classifier and a text tower, trained together.

    Exposes the classifier's passes (``forward``, ``forward_features``, ``forward_with_features``,
    ``forward_head``) and ``encode_text``, so every pass can run through one DDP wrapper.
    State-dict keys: ``student.<classifier keys>`` and ``text.<text tower keys>``.
    """

    def __init__(self, student: ImageClassifier, text: TextTower) -> None:
        super().__init__()
        self.student = student
        self.text = text

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def forward_features(self, images: Tensor, **kwargs: Any) -> Any:
        return self.student.forward_features(images, **kwargs)

    def forward_with_features(self, images: Tensor, **kwargs: Any) -> Any:
        return self.student.forward_with_features(images, **kwargs)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.student.forward_head(features)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.text.encode(tokens)


@register_task
class ContrastiveTask(TaskObjective):
    """``L_task = InfoNCE(f_I(x), f_T(caption))`` over the global batch (see the module docstring)."""

    key = "contrastive"
    description = "FLYP: contrastive loss between images and template captions; both towers train"

    def __init__(self, method: ComposedMethod) -> None:
        super().__init__(method)
        side: TextSide = method.context("text")
        self.side = side
        self.pair = TowerPair(method.student, side.tower)

    @classmethod
    def needs(cls, options: MethodOptions, owner: str = "") -> Needs:
        return Needs(text_tower=True, captions=True)

    def configure_trainable(self) -> None:
        self.pair.requires_grad_(True)
        self.method.student.head.requires_grad_(False)  # rebuilt from the text tower, never trained

    def trainable_module(self) -> nn.Module:
        return self.pair

    def sync_head(self) -> None:
        side = self.side
        refresh_head(self.method.student, side.tower, side.tokenizer, side.classnames, side.templates)

    def forward(self, step: Step) -> Tensor:
        m, images, batch = self.method, step.images, step.batch
        if "template" not in batch:
            raise RuntimeError("contrastive: the batch has no 'template' (the loader must yield caption rows)")
        n = images.shape[0]
        stacked = torch.cat([images, *step.extra]) if step.extra else images
        kwargs = {}
        grad: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if step.cam_kind is not None and not step.extra:
            kwargs = {"return_attn": step.cam_kind == "mmcam", "return_ln1": step.cam_kind == "gradcam"}
            grad = torch.enable_grad() if not torch.is_grad_enabled() else contextlib.nullcontext()
        with grad:  # slices too: a student CAM differentiates through them
            logits, out = m.student_call("forward_with_features", stacked, **kwargs)
            step.logits, step.features, step.clean = logits[:n], out.features[:n], out if kwargs else None
        start = n
        for chunk in step.extra:
            stop = start + chunk.shape[0]
            step.extra_out.append((logits[start:stop], out.features[start:stop]))
            start = stop
        texts = _captions(batch["label"], batch["template"], self.side.classnames, self.side.templates)
        tokens = self.side.tokenizer(texts).to(images.device)
        text_features = m.student_call("encode_text", tokens)
        labels = all_gather_with_grad(step.labels) if self.options.multi_positive else None
        loss = clip_contrastive_loss(all_gather_with_grad(step.features), all_gather_with_grad(text_features),
                                     self.side.tower.logit_scale, labels=labels)
        return loss


def _captions(labels: Tensor, templates_idx: Tensor, classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    from robustft.data.captions import captions

    return captions(labels, templates_idx, classnames, templates)
