"""Image transforms: PIL image in, float tensor ``[3, H, W]`` in ``[0, 1]`` out.

Transforms never normalise: the model applies CLIP's mean/std itself (see
docs/architecture.md), so masking and refilling can work in plain pixel space.
The evaluation transform is CLIP's: resize the shorter side to ``image_size`` (bicubic,
antialiased), center crop ``image_size`` x ``image_size``, convert to a tensor. The paper
trains with the same transform (no augmentation); ``train_augment=True`` swaps the resize
and crop for a random resized crop (area range ``crop_scale``) and, with ``flip``, a random
horizontal flip. FLYP's training transform is ``crop_scale=(0.9, 1.0), flip=False``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from robustft.errors import ConfigError, choices_hint

__all__ = ["INTERPOLATIONS", "build_transform", "ImageTransform"]

ImageTransform = Callable[[Image.Image], torch.Tensor]

INTERPOLATIONS: dict[str, InterpolationMode] = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def build_transform(
    image_size: int,
    *,
    train_augment: bool = False,
    interpolation: str = "bicubic",
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip: bool = True,
) -> ImageTransform:
    """Build the PIL -> tensor transform for training or evaluation.

    Args:
        image_size: Output side length in pixels (the model's input size, e.g. 224).
        train_augment: Use ``RandomResizedCrop(scale=crop_scale)`` (+ a random horizontal
            flip with ``flip``) instead of the deterministic resize + center crop. Off by
            default, as in the paper.
        interpolation: ``"bicubic"`` (CLIP's choice), ``"bilinear"`` or ``"nearest"``.
        crop_scale: Area range of the random crop, each in ``(0, 1]``; used only with
            ``train_augment``.
        flip: With ``train_augment``, flip horizontally with probability 0.5.

    Returns:
        A callable mapping an RGB PIL image to a float tensor ``[3, image_size, image_size]``
        with values in ``[0, 1]``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ConfigError(f"image_size must be a positive integer (e.g. 224), got {image_size!r}")
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {interpolation!r}; {choices_hint(interpolation, INTERPOLATIONS)}")
    mode = INTERPOLATIONS[interpolation]
    if train_augment:
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ConfigError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")
        low, high = float(crop_scale[0]), float(crop_scale[1])
        steps: list[Callable] = [T.RandomResizedCrop(image_size, scale=(low, high), interpolation=mode, antialias=True)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(image_size, interpolation=mode, antialias=True), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor()])
