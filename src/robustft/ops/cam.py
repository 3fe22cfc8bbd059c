"""Class activation maps over ViT patch tokens, as pure tensor maths.

The model layer (``robustft.model.cam``) runs the classifier, collects attention maps,
activations and their gradients, and hands them to the functions below. Nothing here
knows about models, so every rule can be checked against hand-computed numbers.

Token layout everywhere: ``L = 1 + N`` tokens, token 0 is CLS, tokens ``1..N`` are the
patches in row-major order of the patch grid (the order of a ViT's patch embedding).

All functions are vectorised over the batch, keep the input's device, work with or
without autograd, and never use float64. Half-precision inputs are computed in float32
(the relevance products accumulate over every layer and lose too much in 16 bits), and
:func:`mmcam` and :func:`gradcam` switch autocast off inside, so a caller under bf16
autocast (a training step with ``optim.precision: bf16``) still gets float32 maths.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

from robustft.ops.precision import float32_region

__all__ = ["mmcam", "gradcam", "normalize_cam", "cam_to_grid", "grid_to_cam"]

logger = logging.getLogger(__name__)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for 16-bit floats, the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def mmcam(attn: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """Gradient-weighted attention rollout (Chefer et al., ICCV 2021), CLS row.

    Starting from ``R = I`` (L x L, per image), for every layer in order::

        Abar = mean over heads of clamp(grad * A, min=0)     # [B, L, L]
        R    = R + Abar @ R

    and the CAM is ``R[:, 0, 1:]``: how much each patch token contributes to CLS.

    Args:
        attn: Per layer, post-softmax attention ``[B, heads, L, L]``, first layer first.
        grads: Per layer, the gradient of the target score w.r.t. that attention map,
            same shapes as ``attn``.

    Returns:
        Raw (unnormalised) CAM ``[B, L - 1]``, values ``>= 0``, dtype of the inputs
        (float32 for 16-bit inputs, also under an enclosing autocast).

    Raises:
        ValueError: If the lists are empty, differ in length, or shapes do not match.
    """
    if len(attn) == 0 or len(attn) != len(grads):
        raise ValueError(f"mmcam needs one gradient per attention map and at least one layer; got {len(attn)} "
                         f"attention maps and {len(grads)} gradients")
    first = attn[0]
    if first.dim() != 4 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"attention maps must be [B, heads, L, L]; got {tuple(first.shape)}")
    batch, length = first.shape[0], first.shape[-1]
    dtype = _compute_dtype(first)
    relevance = torch.eye(length, dtype=dtype, device=first.device).expand(batch, length, length)
    with float32_region(first.device):  # autocast would run the bmm in bf16
        for layer, (a, g) in enumerate(zip(attn, grads)):
            if a.shape != g.shape or a.dim() != 4 or a.shape[0] != batch or a.shape[-2:] != (length, length):
                raise ValueError(f"layer {layer}: attention {tuple(a.shape)} and gradient {tuple(g.shape)} must both "
                                 f"be [{batch}, heads, {length}, {length}]")
            abar = (g.to(dtype) * a.to(dtype)).clamp(min=0).mean(dim=1)
            relevance = relevance + torch.bmm(abar, relevance)
    return relevance[:, 0, 1:]


def gradcam(act: Tensor, grad: Tensor) -> Tensor:
    """Grad-CAM on token activations.

    Channel weights are the gradient summed over ALL tokens (CLS included); the CAM is
    ``relu(sum_c weight_c * act[:, 1:, c])`` at the patch tokens.

    Args:
        act: Activations ``[B, L, W]`` (the faithful choice is the output of the last
            block's first LayerNorm, i.e. the input of its attention).
        grad: Gradient of the target score w.r.t. ``act``, ``[B, L, W]``.

    Returns:
        Raw CAM ``[B, L - 1]``, values ``>= 0``.

    Raises:
        ValueError: If the shapes differ or are not 3-D.
    """
    if act.dim() != 3 or act.shape != grad.shape:
        raise ValueError(f"gradcam needs activations and gradients of the same shape [B, L, W]; got "
                         f"{tuple(act.shape)} and {tuple(grad.shape)}")
    dtype = _compute_dtype(act)
    with float32_region(act.device):  # autocast would run the einsum in bf16
        weights = grad.to(dtype).sum(dim=1)  # [B, W]
        cam = torch.einsum("bw,blw->bl", weights, act[:, 1:].to(dtype))
    return torch.relu(cam)


def normalize_cam(cam: Tensor, eps: float = 1e-8) -> Tensor:
    """Divide each image's CAM by its maximum (no min subtraction).

    Args:
        cam: Raw CAM ``[B, N]``, values ``>= 0``.
        eps: Added to the maximum so an all-zero CAM stays zero instead of NaN.

    Returns:
        ``[B, N]`` with values in ``[0, 1)`` for non-negative input.
    """
    if cam.dim() != 2:
        raise ValueError(f"normalize_cam expects [B, N]; got {tuple(cam.shape)}")
    return cam / (cam.amax(dim=1, keepdim=True) + eps)


def cam_to_grid(cam: Tensor, grid: tuple[int, int]) -> Tensor:
    """Reshape a token-ordered CAM ``[B, N]`` to the patch grid ``[B, gh, gw]`` (row-major)."""
    gh, gw = grid
    if cam.dim() != 2 or cam.shape[1] != gh * gw:
        raise ValueError(f"cannot lay a CAM of shape {tuple(cam.shape)} on a {gh}x{gw} patch grid "
                         f"(needs [B, {gh * gw}])")
    return cam.reshape(cam.shape[0], gh, gw)


def grid_to_cam(cam_grid: Tensor) -> Tensor:
    """Flatten a patch-grid CAM ``[B, gh, gw]`` back to token order ``[B, gh * gw]``."""
    if cam_grid.dim() != 3:
        raise ValueError(f"grid_to_cam expects [B, gh, gw]; got {tuple(cam_grid.shape)}")
    return cam_grid.reshape(cam_grid.shape[0], -1)
