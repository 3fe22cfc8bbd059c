"""What a model expects of its input images: :class:`PreprocessCfg` and the eval transform.

A CLIP model is trained on images resized so that the shorter side equals the model's
image size (bicubic), center-cropped to a square, then normalised with fixed per-channel
mean and std. In robustft images stay in [0, 1] everywhere outside the model, so the
transform built here stops at ``ToTensor()``; :class:`robustft.model.ImageClassifier`
applies the mean/std normalisation itself, as its first step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from robustft.data.transforms import build_transform
from robustft.errors import ModelError, choices_hint

__all__ = ["PreprocessCfg", "build_eval_transform", "resize_center_crop"]

_INTERPOLATIONS = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}
_RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class PreprocessCfg:
    """Input geometry and normalisation a model expects (plain data, JSON-friendly).

    Attributes:
        image_size: Side of the square model input, in pixels (224 for ViT-B/32).
        mean: Per-channel mean subtracted from [0, 1] RGB values.
        std: Per-channel standard deviation divided out after the mean.
        interpolation: Resize filter: "bicubic" (CLIP), "bilinear" or "nearest".
        resize_mode: "shortest" (shorter side to image_size, then center crop; CLIP) or
            "squash" (resize both sides to image_size, ignoring aspect ratio).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if int(self.image_size) <= 0:
            raise ModelError(f"image_size must be a positive number of pixels, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ModelError(f"mean and std need 3 values (RGB), got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ModelError(f"std values must be positive, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            hint = choices_hint(self.interpolation, _INTERPOLATIONS)
            raise ModelError(f"unknown interpolation {self.interpolation!r}; {hint}")
        if self.resize_mode not in _RESIZE_MODES:
            hint = choices_hint(self.resize_mode, _RESIZE_MODES)
            raise ModelError(f"unsupported resize_mode {self.resize_mode!r}; {hint}")
        # Normalise containers so that equality and JSON round trips are exact.
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessCfg:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ModelError(f"unknown preprocess keys {unknown}; valid: {sorted(fields)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def build_eval_transform(preprocess: PreprocessCfg) -> Callable[[Image.Image], torch.Tensor]:
    """Build the deterministic eval (and, per the recipe, train) transform.

    PIL image (any mode) -> RGB -> resize (shorter side to ``image_size`` for "shortest")
    -> center crop ``image_size`` -> ``ToTensor()``. No normalisation: the classifier does it.

    Returns:
        A callable mapping a PIL image to a float tensor [3, S, S] in [0, 1].
    """
    size = preprocess.image_size
    if preprocess.resize_mode == "shortest":
        # The data layer owns CLIP's resize + center-crop geometry; reuse it.
        geometry = build_transform(size, interpolation=preprocess.interpolation)
        return T.Compose([T.Lambda(_to_rgb), geometry])
    interp = _INTERPOLATIONS[preprocess.interpolation]
    return T.Compose([T.Lambda(_to_rgb), T.Resize((size, size), interpolation=interp, antialias=True), T.ToTensor()])


def _to_rgb(image: Image.Image) -> Image.Image:
    # Grey-scale, palette and RGBA images all occur in ImageNet-style folders.
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_center_crop(images: torch.Tensor, preprocess: PreprocessCfg) -> torch.Tensor:
    """Apply the eval geometry to a batch that is already a tensor.

    Args:
        images: [B, 3, H, W] floats in [0, 1].
        preprocess: The model's preprocessing config.

    Returns:
        [B, 3, S, S] with S = ``preprocess.image_size``; returned unchanged if already S x S.
    """
    size = preprocess.image_size
    if images.shape[-2:] == (size, size):
        return images
    interp = _INTERPOLATIONS[preprocess.interpolation]
    resize_to: int | tuple[int, int] = size if preprocess.resize_mode == "shortest" else (size, size)
    out = T.functional.resize(images, resize_to, interpolation=interp, antialias=True)
    # Bicubic overshoots slightly outside [0, 1]; keep the [0, 1] convention.
    return T.functional.center_crop(out, [size, size]).clamp_(0.0, 1.0)
