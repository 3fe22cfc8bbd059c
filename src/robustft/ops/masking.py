"""Masked counterfactual images: which patches, which donors, and the refill.

The strategies (``ObjMaskSingleFill(0.3)`` and the other eight, in the paper's notation)
are parsed by :mod:`robustft.ops.masking_spec`; this module applies a :class:`MaskingSpec`
to a batch (:func:`build_counterfactual`) from its parts: patch selection, donors, refill.

Images are floats in [0, 1], ``[B, C, H, W]``; patches follow the ViT patch grid in
row-major order, so patch ``n`` is token ``n + 1`` of the ViT (token 0 is CLS).

Randomness: every draw takes an explicit ``torch.Generator`` and happens on
``generator.device``; results are then moved to the device of the data (images or CAM).
A CPU generator therefore gives identical draws whatever device the images live on; a
generator on the images' device avoids a host-to-device copy. Same generator state ->
same draw. :func:`make_generator` derives a different stream per distributed rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from robustft.errors import ConfigError
from robustft.ops.masking_spec import MASKING_DEFAULTS, MASKING_NAMES, MaskingSpec, _as_unit_float, parse_masking

__all__ = [
    "MASKING_DEFAULTS",
    "MASKING_NAMES",
    "MaskingSpec",
    "parse_masking",
    "grid_shape",
    "patchify",
    "unpatchify",
    "select_patches",
    "single_donors",
    "multi_donors",
    "min_batch_size",
    "refill",
    "keep_indices_random",
    "key_mask_from",
    "Counterfactual",
    "build_counterfactual",
    "make_generator",
]


# ----------------------------------------------------------------------------- patch grid
def grid_shape(image_size: int | tuple[int, int], patch: int) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of an image of ``image_size`` (int or ``(H, W)``) pixels.

    Raises:
        ConfigError: If the patch size is not positive or does not divide H and W.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if patch <= 0 or height % patch or width % patch:
        raise ConfigError(f"image size {height}x{width} is not divisible by the patch size {patch}; use an "
                          f"image size that is a multiple of {patch} (e.g. {max(patch, 1) * 7})")
    return height // patch, width // patch


def patchify(images: Tensor, patch: int) -> Tensor:
    """Cut ``[B, C, H, W]`` images into row-major patches ``[B, N, C, p, p]``."""
    b, c, h, w = images.shape
    gh, gw = grid_shape((h, w), patch)
    x = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c, patch, patch)


def unpatchify(patches: Tensor, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, N, C, p, p]`` on a ``(gh, gw)`` grid -> ``[B, C, H, W]``."""
    b, n, c, p, _ = patches.shape
    gh, gw = grid
    if n != gh * gw:
        raise ValueError(f"{n} patches do not fill a {gh}x{gw} grid")
    x = patches.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, gh * p, gw * p)


# ----------------------------------------------------------------------------- random draws
def make_generator(seed: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for mask/donor draws, seeded ``seed * 1000003 + rank`` (mod 2**64).

    Different ranks get different streams, so distributed processes draw different masks.
    """
    if rank < 0:
        raise ConfigError(f"rank must be >= 0; got {rank}")
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed((int(seed) * 1_000_003 + int(rank)) % 2**64)
    return generator


def keep_indices_random(batch: int, num_patches: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Random patch tokens to KEEP for MAE-style dropping (RandMaskNoFill).

    Returns:
        ``[B, K]`` long, ``K = int(num_patches * (1 - ratio))`` (the reference's rounding),
        distinct indices in ``[0, N)`` sorted ascending per row, on ``generator.device``.
    """
    ratio = _as_unit_float(ratio, "drop ratio")
    keep = int(num_patches * (1 - ratio))
    noise = torch.rand((batch, num_patches), generator=generator, device=generator.device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def _keep_to_mask(keep_idx: Tensor, num_patches: int) -> Tensor:
    """``[B, K]`` kept indices -> ``[B, N]`` bool, True = dropped."""
    mask = torch.ones((keep_idx.shape[0], num_patches), dtype=torch.bool, device=keep_idx.device)
    return mask.scatter(1, keep_idx, False)


def select_patches(spec: MaskingSpec, *, num_patches: int, batch: int, cam_norm: Tensor | None = None,
                   generator: torch.Generator, device: torch.device | str | None = None) -> Tensor:
    """Which patches a strategy masks (replaces, drops or blocks).

    Rand with a fill: each patch independently, ``rand < p``. RandMaskNoFill: exactly
    ``N - int(N * (1 - r))`` random patches (the complement of :func:`keep_indices_random`).
    Obj: ``cam_norm > t`` (strict). Ctx: ``cam_norm <= t``. Obj/Ctx draw nothing.

    Args:
        spec: The strategy.
        num_patches: N, patches per image.
        batch: B.
        cam_norm: Max-normalised CAM ``[B, N]``; required for Obj/Ctx.
        generator: Source of randomness for Rand.
        device: Where to put the result (default: ``cam_norm``'s or the generator's device).

    Returns:
        ``[B, N]`` bool, True = masked.
    """
    if spec.needs_cam:
        if cam_norm is None:
            raise ConfigError(f"{spec.name} selects patches by a class activation map; pass cam_norm [B, N]")
        if tuple(cam_norm.shape) != (batch, num_patches):
            raise ValueError(f"cam_norm has shape {tuple(cam_norm.shape)}; expected [{batch}, {num_patches}]")
        mask = cam_norm > spec.value if spec.region == "obj" else cam_norm <= spec.value
    elif spec.fill == "none":
        mask = _keep_to_mask(keep_indices_random(batch, num_patches, spec.value, generator), num_patches)
    else:
        mask = torch.rand((batch, num_patches), generator=generator, device=generator.device) < spec.value
    return mask if device is None else mask.to(device)


def single_donors(batch: int, generator: torch.Generator, derangement: bool = False) -> Tensor:
    """One donor per image: a uniformly random permutation (or derangement) of the batch.

    Returns:
        ``[B]`` long on ``generator.device``; image ``i`` takes its patches from ``donors[i]``.
        A permutation may map an image to itself (faithful); a derangement never does.
    """
    if derangement and batch < 2:
        raise ConfigError(f"a derangement needs a batch of at least 2 images (no image may be its own donor); "
                          f"got batch size {batch}")
    own = torch.arange(batch, device=generator.device)
    while True:  # rejection sampling keeps derangements uniform; ~e tries on average
        perm = torch.randperm(batch, generator=generator, device=generator.device)
        if not derangement or not bool((perm == own).any()):
            return perm


def multi_donors(batch: int, num_patches: int, generator: torch.Generator) -> Tensor:
    """A donor per patch, uniform among the OTHER images of the batch.

    Returns:
        ``[B, N]`` long on ``generator.device``, ``donors[i, n] != i``.
    """
    if batch < 2:
        raise ConfigError(f"MultiFill takes patches from other images, so it needs a batch of at least 2; "
                          f"got batch size {batch}")
    draw = torch.randint(0, batch - 1, (batch, num_patches), generator=generator, device=generator.device)
    own = torch.arange(batch, device=generator.device).unsqueeze(1)
    return draw + (draw >= own).long()  # skip over the image's own index


def min_batch_size(spec: MaskingSpec) -> int:
    """Fewest images a batch needs for ``spec``: 2 when donors must be OTHER images, else 1.

    MultiFill and derangement donors never take an image's own patches, so they need a
    second image; a permutation may map an image to itself, and NoFill takes no donor.
    """
    return 2 if spec.fill == "multi" or (spec.fill == "single" and spec.donors == "derangement") else 1


def refill(images: Tensor, mask: Tensor, donors: Tensor, patch: int) -> Tensor:
    """Replace masked patches by the donor image's patch at the same position.

    Args:
        images: ``[B, C, H, W]``.
        mask: ``[B, N]`` bool, True = replace.
        donors: ``[B]`` (one donor per image) or ``[B, N]`` (one per patch), long.
        patch: Patch size in pixels.

    Returns:
        New ``[B, C, H, W]`` tensor; unmasked pixels equal the input. Differentiable
        w.r.t. ``images``; the input is not modified.
    """
    grid = grid_shape((int(images.shape[-2]), int(images.shape[-1])), patch)
    patches = patchify(images, patch)
    b, n = patches.shape[:2]
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [{b}, {n}]")
    donors = donors.to(images.device)
    if donors.dim() == 1 and donors.shape[0] == b:
        donor_patches = patches[donors]
    elif tuple(donors.shape) == (b, n):
        donor_patches = patches[donors, torch.arange(n, device=images.device).unsqueeze(0)]
    else:
        raise ValueError(f"donors has shape {tuple(donors.shape)}; expected [{b}] or [{b}, {n}]")
    replace = mask.to(device=images.device, dtype=torch.bool)[:, :, None, None, None]
    mixed = torch.where(replace, donor_patches, patches)
    return unpatchify(mixed, grid)


def key_mask_from(mask: Tensor) -> Tensor:
    """Attention key mask for Obj/CtxMaskNoFill: ``[B, N]`` bool, True = no token may attend to it.

    CLS is never blocked, so every query keeps at least one key.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, N]; got {tuple(mask.shape)}")
    return mask.to(torch.bool)


# ----------------------------------------------------------------------------- entry point
@dataclass(frozen=True)
class Counterfactual:
    """What a masking strategy did to a batch.

    Attributes:
        images: Refilled images ``[B, C, H, W]``, or the originals for NoFill.
        mask: ``[B, N]`` bool, True = replaced / dropped / blocked.
        donors: ``[B]`` (SingleFill), ``[B, N]`` (MultiFill) or None (NoFill).
        keep_idx: ``[B, K]`` kept patch indices (CLS excluded) for RandMaskNoFill, else None.
        key_mask: ``[B, N]`` blocked attention keys for Obj/CtxMaskNoFill, else None.
    """

    images: Tensor
    mask: Tensor
    donors: Tensor | None = None
    keep_idx: Tensor | None = None
    key_mask: Tensor | None = None


def build_counterfactual(images: Tensor, spec: MaskingSpec, *, patch: int, cam_norm: Tensor | None = None,
                         generator: torch.Generator) -> Counterfactual:
    """Apply a masking strategy to a batch of ``[B, C, H, W]`` images in [0, 1].

    Draw order (fixed, for reproducibility): the mask first, then the donors. All outputs
    are on ``images.device``.

    Args:
        images: Clean images ``[B, C, H, W]``.
        spec: The strategy.
        patch: ViT patch size in pixels.
        cam_norm: Max-normalised CAM ``[B, N]`` (Obj/Ctx only).
        generator: Source of randomness.
    """
    batch = images.shape[0]
    grid = grid_shape((int(images.shape[-2]), int(images.shape[-1])), patch)
    num_patches = math.prod(grid)
    device = images.device
    if spec.fill == "none" and spec.region == "rand":
        keep_idx = keep_indices_random(batch, num_patches, spec.value, generator).to(device)
        return Counterfactual(images=images, mask=_keep_to_mask(keep_idx, num_patches), keep_idx=keep_idx)
    mask = select_patches(spec, num_patches=num_patches, batch=batch, cam_norm=cam_norm, generator=generator,
                          device=device)
    if spec.fill == "none":
        return Counterfactual(images=images, mask=mask, key_mask=key_mask_from(mask))
    if spec.fill == "single":
        donors = single_donors(batch, generator, derangement=spec.donors == "derangement").to(device)
    else:
        donors = multi_donors(batch, num_patches, generator).to(device)
    return Counterfactual(images=refill(images, mask, donors, patch), mask=mask, donors=donors)
