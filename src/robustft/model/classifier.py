"""The image classifier every method trains: CLIP's image tower plus a cosine-linear head.

``ImageClassifier`` takes images in [0, 1], applies CLIP's mean/std normalisation itself,
runs the image tower (through :func:`robustft.model.vit.vit_forward` for ViTs, so that
attention maps, token dropping and attention key masks are available) and a
:class:`ClassifierHead`. Its state dict holds ``visual.<open_clip names>``,
``head.weight`` [C, D] and ``head.bias`` [C], so a fine-tuned image tower loads straight
back into an open_clip model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from robustft.errors import ModelError
from robustft.model.prompts import load_classnames, load_templates
from robustft.model.transforms import PreprocessCfg, build_eval_transform, resize_center_crop
from robustft.model.vit import VitOutput, vit_forward, vit_unsupported_reason
from robustft.model.zeroshot import build_zeroshot_weights
from robustft.ops.precision import float32_region

if TYPE_CHECKING:
    from robustft.model.clip import ClipBundle

__all__ = ["ClassifierHead", "ImageClassifier", "build_zeroshot_classifier", "predict"]


class ClassifierHead(nn.Module):
    """Linear layer on L2-normalised features: ``logits = normalize(f) @ weight.T + bias``.

    Args:
        weight: [C, D] initial weight (copied; trainable).
        bias: [C] initial bias (copied; trainable); zeros when None.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ModelError(f"head weight must be [C, D], got shape {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ModelError(f"head bias must be [C={weight.shape[0]}], got shape {tuple(bias.shape)}")
        self.weight = nn.Parameter(weight.detach().clone())
        init_bias = bias.detach().clone() if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
        self.bias = nn.Parameter(init_bias.to(weight.device))

    @classmethod
    def from_zeroshot(cls, zeroshot_weights: Tensor, logit_scale: Tensor | float) -> ClassifierHead:
        """Head with weight ``logit_scale.exp() * W`` and zero bias.

        Args:
            zeroshot_weights: W [C, D] with unit rows (see ``build_zeroshot_weights``).
            logit_scale: CLIP's log temperature (``model.logit_scale``; exp is 100 for OpenAI CLIP).
        """
        scale = torch.as_tensor(logit_scale, dtype=zeroshot_weights.dtype).detach().exp()
        return cls(zeroshot_weights.detach() * scale.to(zeroshot_weights.device))

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, features: Tensor) -> Tensor:
        """[B, D] features (any norm) -> [B, C] float32 logits.

        Computed in float32 even under bf16 autocast: the logits carry CLIP's x100 scale,
        where bf16's 8-bit mantissa would round nearby classes to ties (or swap them).
        """
        with float32_region(features.device):
            return F.linear(F.normalize(features.float(), dim=-1), self.weight.float(), self.bias.float())


class ImageClassifier(nn.Module):
    """CLIP image tower + :class:`ClassifierHead`, fed with [0, 1] images.

    Args:
        visual: An open_clip image tower (``model.visual``); used as is, not copied.
        head: The classification head.
        preprocess: The tower's input config; its mean/std are applied in ``forward``.
    """

    def __init__(self, visual: nn.Module, head: ClassifierHead, preprocess: PreprocessCfg) -> None:
        super().__init__()
        self.visual = visual
        self.head = head
        self.preprocess = preprocess
        # Not persistent: they are derived from `preprocess`, which is saved as JSON.
        self.register_buffer("pixel_mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)
        self._vit_problem = vit_unsupported_reason(visual)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def is_vit(self) -> bool:
        """Whether the options of :meth:`forward_features` are available."""
        return self._vit_problem is None

    @property
    def patch_size(self) -> int:
        """Side of a (square) patch in pixels, e.g. 32 for ViT-B/32."""
        self.require_vit("patch_size")
        height, width = self.visual.patch_size
        if height != width:
            raise ModelError(f"non-square patches {height}x{width} are not supported")
        return int(height)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (gh, gw) of a model-sized input, e.g. (7, 7) for ViT-B/32 at 224 px."""
        self.require_vit("grid_size")
        return (int(self.visual.grid_size[0]), int(self.visual.grid_size[1]))

    def normalize(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> CLIP-normalised, in the tower's parameter dtype."""
        dtype = next(self.visual.parameters()).dtype
        return ((images - self.pixel_mean) / self.pixel_std).to(dtype)

    def forward_features(
        self,
        images: Tensor,
        *,
        return_attn: bool = False,
        keep_idx: Tensor | None = None,
        key_mask: Tensor | None = None,
        return_ln1: bool = False,
    ) -> VitOutput:
        """Image features with optional extras (see :func:`robustft.model.vit.vit_forward`).

        Args:
            images: [B, 3, H, W] floats in [0, 1], H = W = ``preprocess.image_size``.
            return_attn: Also return every layer's attention [B, heads, L, L].
            keep_idx: [B, K] int64 patch indices to keep (token dropping).
            key_mask: [B, N] bool; True = no token attends to that patch.
            return_ln1: Also return the last block's ln_1 output [B, L, W].

        Returns:
            :class:`VitOutput` with ``features`` [B, D] (not normalised).
        """
        options = return_attn or return_ln1 or keep_idx is not None or key_mask is not None
        x = self.normalize(images)
        if self._vit_problem is not None:
            if options:
                self.require_vit("return_attn/keep_idx/key_mask/return_ln1")
            return VitOutput(features=self.visual(x).float())
        return vit_forward(
            self.visual, x, return_attn=return_attn, keep_idx=keep_idx, key_mask=key_mask, return_ln1=return_ln1
        )

    def forward_head(self, features: Tensor) -> Tensor:
        """[B, D] features -> [B, C] logits."""
        return self.head(features)

    def forward_with_features(
        self,
        images: Tensor,
        *,
        return_attn: bool = False,
        keep_idx: Tensor | None = None,
        key_mask: Tensor | None = None,
        return_ln1: bool = False,
    ) -> tuple[Tensor, VitOutput]:
        """Logits [B, C] and :class:`VitOutput` from ONE pass; options as in :meth:`forward_features`."""
        out = self.forward_features(
            images, return_attn=return_attn, keep_idx=keep_idx, key_mask=key_mask, return_ln1=return_ln1
        )
        return self.head(out.features), out

    def forward(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, C] logits."""
        return self.head(self.forward_features(images).features)

    def require_vit(self, what: str) -> None:
        """Raise ModelError naming ``what`` unless the tower supports the ViT options."""
        if self._vit_problem is not None:
            raise ModelError(f"{what} needs a ViT image tower supported by robustft, but {self._vit_problem}")


def build_zeroshot_classifier(
    bundle: ClipBundle,
    classnames: Sequence[str] | str | os.PathLike[str],
    templates: Sequence[str] | str | os.PathLike[str] = "openai_imagenet",
    *,
    batch_classes: int = 10,
    progress: bool = True,
    use_cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ImageClassifier:
    """Zero-shot CLIP classifier: ``bundle.model.visual`` + head ``logit_scale.exp() * W``.

    Args:
        bundle: From :func:`robustft.model.load_clip`. The classifier SHARES its image
            tower (no copy); deep-copy the classifier to get an independent teacher.
        classnames: Class names, or a class-name set / file (see ``load_classnames``).
        templates: Templates, or a template set / file (see ``load_templates``).
        batch_classes, progress, use_cache, cache_dir: See ``build_zeroshot_weights``.
    """
    names = load_classnames(classnames) if isinstance(classnames, (str, os.PathLike)) else list(classnames)
    temps = load_templates(templates) if isinstance(templates, (str, os.PathLike)) else list(templates)
    weights = build_zeroshot_weights(
        bundle.model,
        bundle.tokenizer,
        names,
        temps,
        batch_classes=batch_classes,
        progress=progress,
        use_cache=use_cache,
        cache_dir=cache_dir,
    )
    head = ClassifierHead.from_zeroshot(weights, bundle.model.logit_scale)
    return ImageClassifier(bundle.model.visual, head, bundle.preprocess)


def predict(
    classifier: ImageClassifier, images: Sequence[Image.Image] | Tensor, batch_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Classify images with the eval transform (resize, center crop; normalisation inside).

    Args:
        classifier: The classifier; its train/eval mode is restored afterwards.
        images: PIL images of any size and mode, or a [N, 3, H, W] tensor in [0, 1].
        batch_size: Images per forward pass.

    Returns:
        ``(top1 [N] int64, probs [N, C] float32)``, both on CPU.
    """
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    transform = build_eval_transform(classifier.preprocess)
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    probs: list[Tensor] = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                if isinstance(chunk, Tensor):
                    batch = resize_center_crop(chunk, classifier.preprocess)
                else:
                    batch = torch.stack([transform(image) for image in chunk])
                logits = classifier(batch.to(device))
                probs.append(logits.float().softmax(dim=-1).cpu())
    finally:
        classifier.train(was_training)
    if not probs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, classifier.num_classes)
    all_probs = torch.cat(probs)
    return all_probs.argmax(dim=-1), all_probs
