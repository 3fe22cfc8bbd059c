"""Masked counterfactual images: which patches, which donors, and the refill.

A masking strategy is written in the paper's notation, ``<Region>Mask<Fill>Fill(value)``:

- Region ``Rand`` (each patch with probability ``value``), ``Obj`` (normalised CAM
  ``> value``) or ``Ctx`` (normalised CAM ``<= value``);
- Fill ``Single`` (one donor image per image, a permutation of the batch), ``Multi``
  (each masked patch from its own donor among the OTHER images) or ``No`` (nothing is
  refilled: ``RandMaskNoFill(r)`` drops a fraction ``r`` of patch tokens MAE-style;
  ``Obj/CtxMaskNoFill(t)`` block attention to the masked patch tokens).

Images are floats in [0, 1], ``[B, C, H, W]``; patches follow the ViT patch grid in
row-major order, so patch ``n`` is token ``n + 1`` of the ViT (token 0 is CLS).

Randomness: every draw takes an explicit ``torch.Generator`` and happens on
``generator.device``; results are then moved to the device of the data (images or CAM).
A CPU generator therefore gives identical draws whatever device the images live on; a
generator on the images' device avoids a host-to-device copy. Same generator state ->
same draw. :func:`make_generator` derives a different stream per distributed rank.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from robustft.errors import ConfigError, choices_hint

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
    "refill",
    "keep_indices_random",
    "key_mask_from",
    "Counterfactual",
    "build_counterfactual",
    "make_generator",
]

logger = logging.getLogger(__name__)

_REGIONS = {"rand": "Rand", "obj": "Obj", "ctx": "Ctx"}
_FILLS = {"none": "No", "single": "Single", "multi": "Multi"}
_DONORS = ("permutation", "derangement")

#: The reference scripts' parameter for each of the nine strategies.
MASKING_DEFAULTS: Mapping[str, float] = MappingProxyType({
    "RandMaskNoFill": 0.75, "ObjMaskNoFill": 0.3, "CtxMaskNoFill": 0.6,
    "RandMaskSingleFill": 0.5, "ObjMaskSingleFill": 0.3, "CtxMaskSingleFill": 0.5,
    "RandMaskMultiFill": 0.5, "ObjMaskMultiFill": 0.6, "CtxMaskMultiFill": 0.3,
})
MASKING_NAMES: tuple[str, ...] = tuple(MASKING_DEFAULTS)
_BY_LOWER_NAME = {
    f"{r}mask{f}fill".lower(): (region, fill) for region, r in _REGIONS.items() for fill, f in _FILLS.items()
}
_SPEC_RE = re.compile(r"\s*([A-Za-z]+)\s*(?:\((.*)\))?\s*", re.DOTALL)
_EXPECTED_FORM = "expected e.g. 'ObjMaskSingleFill(0.3)', 'RandMaskNoFill' or 'ObjMaskSingleFill(0.3, derangement)'"


def _short(obj: object, limit: int = 60) -> str:
    """repr() of a user value, cut to one short line for error messages."""
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_unit_float(value: object, what: str) -> float:
    """Convert a user value to a float in [0, 1] or raise a one-line ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a number in [0, 1]; got {_short(value)}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{what} must be a number in [0, 1]; got {_short(value)}") from None
    if not 0.0 <= number <= 1.0:  # also rejects NaN
        raise ConfigError(f"{what} = {number!r} is outside the valid range [0, 1]")
    return number


@dataclass(frozen=True)
class MaskingSpec:
    """One masking strategy.

    Attributes:
        region: ``"rand"``, ``"obj"`` or ``"ctx"``.
        fill: ``"none"``, ``"single"`` or ``"multi"``.
        value: Probability ``p`` (Rand with a fill), drop ratio ``r`` (RandMaskNoFill) or
            CAM threshold ``t`` (Obj/Ctx); in [0, 1].
        donors: SingleFill donors: ``"permutation"`` (faithful; fixed points leave their
            image unchanged) or ``"derangement"`` (no image is its own donor).
    """

    region: str
    fill: str
    value: float
    donors: str = "permutation"

    def __post_init__(self) -> None:
        for key in ("region", "fill", "donors"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"masking {key} must be a string; got {_short(getattr(self, key))}")
        if self.region not in _REGIONS:
            raise ConfigError(f"masking region {_short(self.region)} is unknown; "
                              f"{choices_hint(str(self.region), _REGIONS)}")
        if self.fill not in _FILLS:
            raise ConfigError(f"masking fill {_short(self.fill)} is unknown; {choices_hint(str(self.fill), _FILLS)}")
        if self.donors not in _DONORS:
            raise ConfigError(f"masking donors {_short(self.donors)} is unknown; "
                              f"{choices_hint(str(self.donors), _DONORS)}")
        if self.donors != "permutation" and self.fill != "single":
            raise ConfigError(f"donors={self.donors!r} only applies to SingleFill strategies; "
                              f"{self.name_stem} always draws its donors by its own rule")
        object.__setattr__(self, "value", _as_unit_float(self.value, f"{self.name_stem} value"))

    @property
    def name_stem(self) -> str:
        """The strategy name without its value, e.g. ``"ObjMaskSingleFill"``."""
        return f"{_REGIONS.get(self.region, self.region)}Mask{_FILLS.get(self.fill, self.fill)}Fill"

    @property
    def name(self) -> str:
        """Paper notation, e.g. ``"ObjMaskSingleFill(0.3)"``."""
        return f"{self.name_stem}({self.value!r})"

    @property
    def needs_cam(self) -> bool:
        """True when patches are chosen by a class activation map (Obj / Ctx)."""
        return self.region in ("obj", "ctx")

    def as_dict(self) -> dict[str, Any]:
        """The structured form accepted by :func:`parse_masking`."""
        return {"region": self.region, "fill": self.fill, "value": self.value, "donors": self.donors}

    def __str__(self) -> str:
        """Paper notation; a non-default donor rule is appended, e.g. ``"...(0.3, derangement)"``."""
        if self.donors == "permutation":
            return self.name
        return f"{self.name_stem}({self.value!r}, {self.donors})"


def _parse_text(text: str) -> MaskingSpec:
    match = _SPEC_RE.fullmatch(text)
    if match is None:
        raise ConfigError(f"masking spec {_short(text)} is malformed; {_EXPECTED_FORM}")
    stem, args = match.group(1), match.group(2)
    if stem.lower() not in _BY_LOWER_NAME:
        raise ConfigError(f"unknown masking strategy {_short(stem)}; {choices_hint(stem, MASKING_NAMES)}")
    region, fill = _BY_LOWER_NAME[stem.lower()]
    canonical = f"{_REGIONS[region]}Mask{_FILLS[fill]}Fill"
    parts = [p.strip() for p in args.split(",")] if args is not None and args.strip() else []
    if len(parts) > 2 or any(not p for p in parts):
        raise ConfigError(f"masking spec {_short(text)} is malformed; {_EXPECTED_FORM}")
    value = MASKING_DEFAULTS[canonical] if not parts else _parse_number(parts[0], text)
    donors = "permutation"
    if len(parts) == 2:
        donors = re.sub(r"^donors\s*=\s*", "", parts[1]).strip().lower()
    return MaskingSpec(region, fill, value, donors)


def _parse_number(part: str, text: str) -> float:
    try:
        return float(part)
    except ValueError:
        raise ConfigError(f"masking spec {_short(text)}: {_short(part)} is not a number; {_EXPECTED_FORM}") from None


def _parse_mapping(spec: Mapping[Any, Any]) -> MaskingSpec:
    allowed = ("region", "fill", "value", "donors")
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown masking key(s) {', '.join(_short(k, 30) for k in unknown)}; "
                          f"{choices_hint(str(unknown[0]), allowed)}")
    missing = [k for k in ("region", "fill") if k not in spec]
    if missing:
        raise ConfigError(f"masking dict is missing {' and '.join(missing)}; expected e.g. "
                          "{'region': 'obj', 'fill': 'single', 'value': 0.3}")
    region, fill, donors = spec["region"], spec["fill"], spec.get("donors", "permutation")
    for key, val in (("region", region), ("fill", fill), ("donors", donors)):
        if not isinstance(val, str):
            raise ConfigError(f"masking {key} must be a string; got {_short(val)}")
    region, fill, donors = region.strip().lower(), fill.strip().lower(), donors.strip().lower()
    if "value" in spec:
        value = spec["value"]
    elif region in _REGIONS and fill in _FILLS:
        value = MASKING_DEFAULTS[f"{_REGIONS[region]}Mask{_FILLS[fill]}Fill"]
    else:
        value = 0.0  # region/fill are invalid; MaskingSpec reports them
    return MaskingSpec(region, fill, value, donors)  # type: ignore[arg-type]


def parse_masking(spec: str | Mapping[str, Any] | MaskingSpec) -> MaskingSpec:
    """Parse a masking strategy from paper notation or a structured dict.

    Accepted forms: ``"ObjMaskSingleFill(0.3)"`` (name case-insensitive, whitespace
    tolerant), a bare name (``"ObjMaskSingleFill"`` uses :data:`MASKING_DEFAULTS`), an
    optional donor rule (``"ObjMaskSingleFill(0.3, derangement)"``), a dict
    ``{"region": "obj", "fill": "single", "value": 0.3, "donors": "permutation"}``
    (``value`` and ``donors`` optional), or a :class:`MaskingSpec` (returned as is).

    Raises:
        ConfigError: Unknown name or key, malformed syntax, or a value outside [0, 1].
    """
    if isinstance(spec, MaskingSpec):
        return spec
    if isinstance(spec, str):
        return _parse_text(spec)
    if isinstance(spec, Mapping):
        return _parse_mapping(spec)
    raise ConfigError(f"a masking strategy must be a string like 'ObjMaskSingleFill(0.3)' or a dict; "
                      f"got {type(spec).__name__}")


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
