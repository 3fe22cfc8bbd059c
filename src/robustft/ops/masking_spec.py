"""Masking strategies in the paper's notation: parse and validate them.

A masking strategy is written ``<Region>Mask<Fill>Fill(value)``:

- Region ``Rand`` (each patch with probability ``value``), ``Obj`` (normalised CAM
  ``> value``) or ``Ctx`` (normalised CAM ``<= value``);
- Fill ``Single`` (one donor image per image, a permutation of the batch), ``Multi``
  (each masked patch from its own donor among the OTHER images) or ``No`` (nothing is
  refilled: ``RandMaskNoFill(r)`` drops a fraction ``r`` of patch tokens MAE-style;
  ``Obj/CtxMaskNoFill(t)`` block attention to the masked patch tokens).

:func:`parse_masking` turns such a string (or a mapping, for config files) into a
:class:`MaskingSpec`; :mod:`robustft.ops.masking` applies it to a batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from robustft.errors import ConfigError, choices_hint

__all__ = ["MASKING_DEFAULTS", "MASKING_NAMES", "MaskingSpec", "parse_masking"]

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
