"""CLIP's symmetric contrastive (InfoNCE) loss between paired image and text features.

Row ``i`` of the image features and row ``i`` of the text features are a pair (an image and
its caption). With ``f_I``, ``f_T`` the L2-normalised features and ``s = exp(logit_scale)``,

    logits = s * f_I @ f_T.T                        [N, N], rows: images, columns: captions
    loss   = (CE(logits, arange(N)) + CE(logits.T, arange(N))) / 2

which is FLYP's objective (its reference passes ``exp(logit_scale)`` to the loss; here the
function takes CLIP's ``logit_scale`` parameter itself, the log, like
:meth:`robustft.model.classifier.ClassifierHead.from_zeroshot`). By default a caption of
another image of the same class is a negative, as in the reference. With ``labels`` every
pair of the same class is a positive (multi-positive variant).

Pure tensor maths: for a global batch spread over ranks, gather the features first
(:func:`robustft.distributed.all_gather_with_grad`) and call the loss on the gathered rows.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.errors import ConfigError

__all__ = ["contrastive_logits", "clip_contrastive_loss", "positive_targets"]


def _autocast_off(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off for ``device``'s type (a no-op where autocast does not exist).

    Inside, ops compute in their inputs' dtype: the loss runs in float32 even in a bf16 step.
    """
    kind = torch.device(device).type
    if torch.amp.is_autocast_available(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def contrastive_logits(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """``exp(logit_scale) * normalize(image_features) @ normalize(text_features).T``, in float32.

    Args:
        image_features: [N, D] image embeddings (any norm; normalised here).
        text_features: [M, D] text embeddings (any norm; normalised here).
        logit_scale: CLIP's LOG temperature (``model.logit_scale``, a 0-d or 1-element
            tensor or a float); exponentiated here, gradient flows into it.

    Returns:
        [N, M] float32 logits, rows images, columns texts. Computed in float32 even under
        a bf16 autocast (the x100 scale would otherwise round nearby logits together).
    """
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ConfigError(
            f"contrastive features must be [N, D] and [M, D] with the same D, got image "
            f"{tuple(image_features.shape)} and text {tuple(text_features.shape)}"
        )
    scale = torch.as_tensor(logit_scale, device=image_features.device)
    if scale.numel() != 1:
        raise ConfigError(f"logit_scale must hold one number, got shape {tuple(scale.shape)}")
    with _autocast_off(image_features.device):
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        return scale.float().reshape(()).exp() * img @ txt.T


def positive_targets(labels: Tensor) -> Tensor:
    """Soft targets of the multi-positive loss: row ``i`` is uniform over ``{j : labels[j] == labels[i]}``.

    Args:
        labels: [N] integer class labels.

    Returns:
        [N, N] float32, rows summing to 1, symmetric (the same matrix serves both directions).
    """
    same = (labels.reshape(-1, 1) == labels.reshape(1, -1)).float()
    return same / same.sum(dim=1, keepdim=True)


def clip_contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE over paired rows: ``(CE(logits, y) + CE(logits.T, y)) / 2``.

    Args:
        image_features: [N, D] image embeddings; row ``i`` pairs with ``text_features[i]``.
        text_features: [N, D] text embeddings (captions).
        logit_scale: CLIP's LOG temperature (``model.logit_scale``), exponentiated here.
        labels: None (default, FLYP's reference): targets ``arange(N)``, one positive per
            row, same-class captions of other images are negatives. [N] class labels: every
            pair with equal labels is a positive; each row's target is uniform over its
            positives (:func:`positive_targets`), soft-target cross-entropy in both
            directions. With all labels distinct this equals the default.

    Returns:
        Scalar float32 loss, the mean over the N rows of each direction, averaged over the
        two directions.
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ConfigError(
            f"contrastive loss needs one caption per image, got {image_features.shape[0]} images and "
            f"{text_features.shape[0]} captions"
        )
    logits = contrastive_logits(image_features, text_features, logit_scale)
    n = logits.shape[0]
    with _autocast_off(logits.device):
        if labels is None:
            targets = torch.arange(n, device=logits.device)
            return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        if labels.shape != (n,):
            raise ConfigError(f"labels must be [N={n}] class indices, got shape {tuple(labels.shape)}")
        soft = positive_targets(labels.to(logits.device))
        per_image = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        per_text = -(soft * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
        return (per_image + per_text) / 2
