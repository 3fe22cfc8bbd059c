"""A forward pass over open_clip's ``VisionTransformer`` weights, with the options robustft needs.

open_clip's own ``VisionTransformer.forward`` cannot return attention maps, drop tokens
chosen by the caller, or block attention to chosen patches. This module re-runs the same
computation from the same parameters (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks[i].{ln_1, attn, ls_1, ln_2,
mlp, ls_2}``, ``ln_post``, ``proj``), so a fine-tuned tower keeps open_clip's parameter
names, and adds:

- ``return_attn``: every layer's post-softmax attention [B, heads, L, L], kept in the
  autograd graph (an explicit softmax path; MMCAM differentiates through it);
- ``keep_idx``: MAE-style token dropping after the positional embedding (CLS always kept);
- ``key_mask``: a boolean key mask so that no token attends TO the masked patches;
- ``return_ln1``: the last block's ln_1 output [B, L, W] (the Grad-CAM activations).

Without ``return_attn`` attention runs through ``F.scaled_dot_product_attention``; both
paths give the same features to float tolerance.

With CLS pooling (``pool_type="tok"``) the last block computes its attention output,
out_proj and MLP for the CLS token only (and, on the fused path, only the CLS query): the
pooled feature reads nothing else from that block, so the other tokens' outputs would be
discarded (about 7% of the FLOPs of a ViT-B forward and backward). Keys and values still
come from every token, and ``return_attn`` still returns the last layer's full map (whose
non-CLS rows get zero gradient either way), so features, maps and gradients are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from robustft.errors import ModelError
from robustft.ops.precision import float32_region

__all__ = ["VitOutput", "vit_unsupported_reason", "vit_forward"]


@dataclass
class VitOutput:
    """What :func:`vit_forward` returns.

    Attributes:
        features: [B, D] projected pooled embedding (ln_post then proj), not L2-normalised;
            float32, with the projection computed in float32 also under bf16 autocast.
        attn: One [B, heads, L, L] post-softmax map per layer (in order), or None.
        ln1: [B, L, W] output of the last block's ln_1, or None.
    """

    features: Tensor
    attn: list[Tensor] | None = None
    ln1: Tensor | None = None


def vit_unsupported_reason(visual: nn.Module) -> str | None:
    """Why :func:`vit_forward` cannot run ``visual``, or None if it can."""
    if not isinstance(visual, VisionTransformer):
        return f"the image tower is a {type(visual).__name__}, not an open_clip VisionTransformer"
    if getattr(visual, "attn_pool", None) is not None:
        return "the ViT uses an attentional pooler"
    if visual.pool_type not in ("tok", "avg"):
        return f"the ViT uses pool_type={visual.pool_type!r} (supported: 'tok', 'avg')"
    for i, blk in enumerate(visual.transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            return f"block {i} is a {type(blk).__name__} (custom attention blocks are not supported)"
        mha = blk.attn
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
            return f"block {i} attention has separate q/k/v projections"
        if mha.bias_k is not None or mha.add_zero_attn:
            return f"block {i} attention uses extra key/value biases"
    return None


def vit_forward(
    visual: VisionTransformer,
    images: Tensor,
    *,
    return_attn: bool = False,
    keep_idx: Tensor | None = None,
    key_mask: Tensor | None = None,
    return_ln1: bool = False,
) -> VitOutput:
    """Run a CLIP ViT image tower with optional attention maps, token keep and key mask.

    Args:
        visual: An open_clip ``VisionTransformer`` (check :func:`vit_unsupported_reason`).
        images: [B, 3, H, W] images already normalised with the model's mean and std.
        return_attn: Return each layer's attention [B, heads, L, L] (graph kept).
        keep_idx: [B, K] int64 indices into the N patches (row-major over the grid) of the
            patch tokens to keep; the CLS token is always kept, so L = K + 1.
        key_mask: [B, N] bool over the N patches of the full grid; True means no token may
            attend to that patch (in every layer). Combined with ``keep_idx`` it is
            gathered at the kept indices.
        return_ln1: Return the last block's ln_1 output [B, L, W].

    Returns:
        A :class:`VitOutput`.
    """
    x = _embed(visual, images)  # [B, 1 + N, W]
    n_patches = x.shape[1] - 1
    if keep_idx is not None:
        x = _keep_tokens(x, keep_idx, n_patches)
    else:
        x = visual.patch_dropout(x)  # open_clip's own PatchDropout; identity unless enabled and training
        if key_mask is not None and x.shape[1] != n_patches + 1:
            raise ModelError("key_mask cannot be combined with open_clip's patch dropout; set patch_dropout to 0")
    x = visual.ln_pre(x)
    allowed = _allowed_keys(key_mask, keep_idx, x.shape[0], n_patches, x.device)

    blocks = visual.transformer.resblocks
    use_ckpt = visual.transformer.grad_checkpointing and torch.is_grad_enabled() and not (return_attn or return_ln1)
    attn_maps: list[Tensor] = []
    ln1: Tensor | None = None
    # Only CLS leaves the last block when it is pooled.
    cls_last = visual.pool_type == "tok"
    for i, blk in enumerate(blocks):
        last = i == len(blocks) - 1
        keep_ln1 = return_ln1 and last
        if use_ckpt:
            x = checkpoint(_block_plain, blk, x, allowed, last and cls_last, use_reentrant=False)
            continue
        x, attn, h = _block(blk, x, allowed, explicit=return_attn, cls_only=last and cls_last)
        if return_attn:
            attn_maps.append(attn)
        if keep_ln1:
            ln1 = h
    return VitOutput(features=_pool(visual, x), attn=attn_maps if return_attn else None, ln1=ln1)


def _embed(visual: VisionTransformer, images: Tensor) -> Tensor:
    """Patchify, prepend CLS, add positional embeddings: [B, 3, H, W] -> [B, 1 + N, W]."""
    x = visual.conv1(images)  # [B, W, gh, gw]
    x = x.flatten(2).transpose(1, 2)  # [B, N, W], patches in row-major grid order
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    if pos.shape[0] != x.shape[1]:
        raise ModelError(
            f"images of size {tuple(images.shape[-2:])} give {x.shape[1] - 1} patches but the model "
            f"expects {pos.shape[0] - 1} ({tuple(visual.image_size)} px input); resize the images first"
        )
    return x + pos.to(x.dtype)


def _keep_tokens(x: Tensor, keep_idx: Tensor, n_patches: int) -> Tensor:
    """Keep CLS plus the patch tokens at ``keep_idx`` [B, K]: [B, 1 + N, W] -> [B, 1 + K, W]."""
    if keep_idx.dim() != 2 or keep_idx.shape[0] != x.shape[0] or keep_idx.dtype != torch.long:
        raise ModelError(
            f"keep_idx must be an int64 tensor [B={x.shape[0]}, K], got {keep_idx.dtype} {tuple(keep_idx.shape)}"
        )
    if not 0 < keep_idx.shape[1] <= n_patches:
        raise ModelError(f"keep_idx must keep between 1 and {n_patches} patches, got K={keep_idx.shape[1]}")
    index = keep_idx.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    patches = torch.gather(x[:, 1:], 1, index)
    return torch.cat([x[:, :1], patches], dim=1)


def _allowed_keys(
    key_mask: Tensor | None, keep_idx: Tensor | None, batch: int, n_patches: int, device: torch.device
) -> Tensor | None:
    """Turn a patch key mask [B, N] into SDPA's boolean mask [B, 1, 1, L] (True = may attend)."""
    if key_mask is None:
        return None
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, n_patches):
        raise ModelError(
            f"key_mask must be a bool tensor [B={batch}, N={n_patches}], got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    masked = key_mask.to(device)
    if keep_idx is not None:
        masked = torch.gather(masked, 1, keep_idx.to(device))
    # CLS is always a valid key, so no query row is ever fully masked (no NaN softmax).
    cls_ok = torch.ones(batch, 1, dtype=torch.bool, device=device)
    return torch.cat([cls_ok, ~masked], dim=1).view(batch, 1, 1, -1)


def _block(
    blk: ResidualAttentionBlock, x: Tensor, allowed: Tensor | None, *, explicit: bool, cls_only: bool = False
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One pre-norm residual block; returns (output, attention or None, ln_1 output).

    With ``cls_only`` the output is [B, 1, W]: the CLS token's, computed from all keys.
    """
    h = blk.ln_1(x)
    out, attn = _attention(blk.attn, h, allowed, explicit=explicit, cls_only=cls_only)
    x = (x[:, :1] if cls_only else x) + blk.ls_1(out)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, attn, h


def _block_plain(blk: ResidualAttentionBlock, x: Tensor, allowed: Tensor | None, cls_only: bool = False) -> Tensor:
    return _block(blk, x, allowed, explicit=False, cls_only=cls_only)[0]


def _attention(
    mha: nn.MultiheadAttention, h: Tensor, allowed: Tensor | None, *, explicit: bool, cls_only: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention from ``nn.MultiheadAttention`` weights.

    Args:
        mha: The block's attention module (packed in_proj, out_proj).
        h: [B, L, W] normalised tokens.
        allowed: [B, 1, 1, L] bool key mask or None.
        explicit: Materialise the post-softmax attention (needed for attention maps).
        cls_only: Output the CLS token only ([B, 1, W]); keys and values are still every
            token, and an explicit map is still the full [B, heads, L, L].

    Returns:
        ([B, L, W] output after out_proj ([B, 1, W] with ``cls_only``),
        [B, heads, L, L] attention or None).
    """
    batch, length, width = h.shape
    heads = mha.num_heads
    p_drop = mha.dropout if mha.training else 0.0
    if cls_only and not explicit:
        return _cls_attention(mha, h, allowed, p_drop), None
    qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn: Tensor | None = None
    if explicit:
        scores = (q * (width // heads) ** -0.5) @ k.transpose(-2, -1)  # [B, heads, L, L]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        attn = scores.softmax(dim=-1)
        probs = F.dropout(attn, p_drop) if p_drop > 0 else attn
        out = (probs[:, :, :1] if cls_only else probs) @ v
        length = 1 if cls_only else length
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p_drop)
    out = out.transpose(1, 2).reshape(batch, length, width)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias), attn


def _cls_attention(mha: nn.MultiheadAttention, h: Tensor, allowed: Tensor | None, p_drop: float) -> Tensor:
    """The CLS row of :func:`_attention`'s fused path: [B, L, W] tokens -> [B, 1, W]."""
    batch, length, width = h.shape
    heads = mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(h[:, :1], w[:width], None if b is None else b[:width])  # [B, 1, W]
    kv = F.linear(h, w[width:], None if b is None else b[width:])  # [B, L, 2W]
    q = q.view(batch, 1, heads, width // heads).transpose(1, 2)
    k, v = kv.view(batch, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p_drop)  # [B, heads, 1, d]
    out = out.transpose(1, 2).reshape(batch, 1, width)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def _pool(visual: VisionTransformer, x: Tensor) -> Tensor:
    """open_clip's pooling for 'tok' (CLS) and 'avg', then the projection: [B, L, W] -> [B, D]."""

    def take(t: Tensor) -> Tensor:
        return t[:, 0] if visual.pool_type == "tok" else t[:, 1:].mean(dim=1)

    if visual.final_ln_after_pool:
        pooled = visual.ln_post(take(x))
    else:
        pooled = take(visual.ln_post(x))
    # The projection runs in float32 even under bf16 autocast: the features are the
    # distillation targets and the head's input (a [B, W] x [W, D] product, cheap).
    with float32_region(pooled.device):
        pooled = pooled.float()
        return pooled @ visual.proj.float() if visual.proj is not None else pooled
