"""Class activation maps of an :class:`ImageClassifier` for the ground-truth class.

This module runs the model and takes the gradients; the maths (attention rollout, the
Grad-CAM combination, max-normalisation) lives in :mod:`robustft.ops.cam`.

- MMCAM (default): forward keeping every layer's attention, gradients of
  ``sum_i logit[i, y_i]`` w.r.t. those attention maps only, then the rollout.
- Grad-CAM: activations and gradients at the last block's ln_1 output.

Gradients are taken with ``torch.autograd.grad(inputs=...)``, so no parameter's ``.grad``
is ever touched and the model's train/eval mode is left alone. :func:`cam_from_forward`
reuses a forward the caller already ran (the clean student forward of a training step),
keeping its graph alive for the loss backward that follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from robustft.errors import ModelError, choices_hint
from robustft.model.classifier import ImageClassifier
from robustft.model.vit import VitOutput
from robustft.ops import cam as cam_ops

__all__ = ["CAM_KINDS", "CamResult", "compute_cam", "cam_from_forward"]

CAM_KINDS = ("mmcam", "gradcam")
_T = TypeVar("_T")


@dataclass
class CamResult:
    """A batch of class activation maps.

    Attributes:
        raw: [B, gh, gw] unnormalised CAM (>= 0), detached from the graph.
        logits: [B, C] logits of the forward that produced it, detached.
    """

    raw: Tensor
    logits: Tensor

    def normalized(self, eps: float = 1e-8) -> Tensor:
        """[B, gh, gw] CAM divided by each image's maximum (values in [0, 1])."""
        batch, gh, gw = self.raw.shape
        return cam_ops.normalize_cam(self.raw.reshape(batch, gh * gw), eps=eps).reshape(batch, gh, gw)


def compute_cam(classifier: ImageClassifier, images: Tensor, labels: Tensor, kind: str = "mmcam") -> CamResult:
    """Run ``classifier`` on ``images`` and return the CAM of each image's label.

    Args:
        classifier: A ViT classifier (student or frozen teacher; either works).
        images: [B, 3, H, W] floats in [0, 1].
        labels: [B] int64 class indices in [0, C).
        kind: "mmcam" or "gradcam".

    Returns:
        :class:`CamResult` with ``raw`` [B, gh, gw].
    """
    _check_kind(kind)
    classifier.require_vit("CAMs")
    with torch.enable_grad():
        # Differentiable input so the attention maps are in the graph even when every
        # parameter is frozen; the input gradient itself is never computed.
        x = images.detach().requires_grad_(True)
        logits, out = classifier.forward_with_features(x, return_attn=kind == "mmcam", return_ln1=kind == "gradcam")
        return cam_from_forward(logits, out, labels, kind, retain_graph=False, grid_size=classifier.grid_size)


def cam_from_forward(
    logits: Tensor,
    vit_output: VitOutput,
    labels: Tensor,
    kind: str = "mmcam",
    retain_graph: bool = True,
    *,
    grid_size: tuple[int, int] | None = None,
) -> CamResult:
    """CAM from a forward already run with ``return_attn`` (MMCAM) or ``return_ln1`` (Grad-CAM).

    Args:
        logits: [B, C] logits of that forward (still attached to its graph).
        vit_output: Its :class:`VitOutput` (all patch tokens present: no ``keep_idx``).
        labels: [B] int64 target classes.
        kind: "mmcam" or "gradcam".
        retain_graph: Keep the graph for a later backward (True inside a training step).
        grid_size: Patch grid (gh, gw); inferred as square from the token count if None.

    Returns:
        :class:`CamResult`; gradients go only to the attention maps / activations.
    """
    _check_kind(kind)
    target = _target_score(logits, labels)
    if kind == "mmcam":
        maps = _require(vit_output.attn, "attention maps (run the forward with return_attn=True)")
        grads = torch.autograd.grad(target, maps, retain_graph=retain_graph)
        raw = cam_ops.mmcam([a.detach() for a in maps], [g.detach() for g in grads])
    else:
        act = _require(vit_output.ln1, "ln_1 activations (run the forward with return_ln1=True)")
        (grad,) = torch.autograd.grad(target, [act], retain_graph=retain_graph)
        raw = cam_ops.gradcam(act.detach(), grad.detach())
    grid = grid_size if grid_size is not None else _square_grid(raw.shape[1])
    if raw.shape[1] != grid[0] * grid[1]:
        raise ModelError(
            f"the forward has {raw.shape[1]} patch tokens but the grid is {grid[0]}x{grid[1]}; "
            "CAMs need all patches (no keep_idx)"
        )
    return CamResult(raw=cam_ops.cam_to_grid(raw, grid), logits=logits.detach())


def _check_kind(kind: str) -> None:
    if kind not in CAM_KINDS:
        raise ModelError(f"unknown CAM kind {kind!r}; {choices_hint(kind, CAM_KINDS)}")


def _target_score(logits: Tensor, labels: Tensor) -> Tensor:
    """sum_i logits[i, labels[i]], checking the labels first."""
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.dtype != torch.long:
        raise ModelError(
            f"labels must be int64 [B={logits.shape[0]}], got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    labels = labels.to(logits.device)
    if labels.numel():
        low, high = torch.stack(torch.aminmax(labels)).tolist()  # one host read (a sync on a GPU), not two
        if low < 0 or high >= logits.shape[1]:
            raise ModelError(f"labels must lie in [0, {logits.shape[1]}); got values in [{low}, {high}]")
    if not logits.requires_grad:
        raise ModelError("CAMs need a forward run with autograd enabled (not under torch.no_grad/inference_mode)")
    return logits.gather(1, labels[:, None]).sum()


def _require(value: _T | None, what: str) -> _T:
    if value is None:
        raise ModelError(f"the forward output has no {what}")
    return value


def _square_grid(n_patches: int) -> tuple[int, int]:
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ModelError(f"{n_patches} patch tokens do not form a square grid; pass grid_size=(gh, gw)")
    return (side, side)
