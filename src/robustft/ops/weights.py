"""Weight-space interpolation between two checkpoints of the same model (WiSE-FT).

``theta(alpha) = (1 - alpha) * theta0 + alpha * theta1`` over every floating-point
tensor, the classification head included; ``theta0`` is conventionally the zero-shot
model and ``theta1`` the fine-tuned one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from robustft.errors import CheckpointError, ConfigError

__all__ = ["assert_compatible", "interpolate_state_dicts", "parse_alphas"]

logger = logging.getLogger(__name__)

_SHOWN = 8  # keys listed per category in a diff message
_MAX_ALPHAS = 10_001
_ALPHA_FORMS = "expected 'start:stop:step' (e.g. '0:1:0.1'), a list (e.g. '0,0.5,1') or one value (e.g. '0.5')"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _is_interpolable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def assert_compatible(theta0: Mapping[str, Any], theta1: Mapping[str, Any]) -> None:
    """Check that two state dicts have the same keys, shapes and kinds of tensors.

    Raises:
        CheckpointError: One line listing the keys missing from ``theta1``, the extra keys
            in ``theta1``, shape mismatches, and float-vs-integer mismatches.
    """
    problems = []
    missing = [k for k in theta0 if k not in theta1]
    extra = [k for k in theta1 if k not in theta0]
    if missing:
        problems.append(f"missing in theta1: {_listing(missing)}")
    if extra:
        problems.append(f"extra in theta1: {_listing(extra)}")
    shapes, kinds = [], []
    for key in theta0:
        if key not in theta1:
            continue
        a, b = theta0[key], theta1[key]
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                kinds.append(f"{key} (tensor vs {type(b if isinstance(a, Tensor) else a).__name__})")
        elif a.shape != b.shape:
            shapes.append(f"{key} {tuple(a.shape)} vs {tuple(b.shape)}")
        elif _is_interpolable(a) != _is_interpolable(b):
            kinds.append(f"{key} ({a.dtype} vs {b.dtype})")
    if shapes:
        problems.append(f"shape mismatch: {_listing(shapes)}")
    if kinds:
        problems.append(f"type mismatch: {_listing(kinds)}")
    if problems:
        raise CheckpointError("the two state dicts are not from the same architecture; " + "; ".join(problems))


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"interpolation alpha = {alpha!r} is outside the valid range [0, 1]")
    return float(alpha)


def interpolate_state_dicts(theta0: Mapping[str, Any], theta1: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Interpolate two compatible state dicts: ``(1 - alpha) * theta0 + alpha * theta1``.

    Floating (and complex) tensors are interpolated in ``theta0``'s dtype and on its
    device; ``alpha = 0`` returns ``theta0``'s values and ``alpha = 1`` ``theta1``'s,
    exactly. Integer/bool tensors (e.g. counters) and non-tensor entries must be equal in
    both and are copied. The result is detached (no autograd graph) and shares no memory
    with the inputs; key order follows ``theta0``.

    Args:
        theta0: State dict at ``alpha = 0`` (e.g. zero-shot).
        theta1: State dict at ``alpha = 1`` (e.g. fine-tuned).
        alpha: Mixing coefficient in [0, 1].

    Raises:
        ConfigError: If ``alpha`` is outside [0, 1].
        CheckpointError: If the state dicts are incompatible or a non-float entry differs.
    """
    alpha = _check_alpha(alpha)
    assert_compatible(theta0, theta1)
    out: dict[str, Any] = {}
    differing = []
    with torch.no_grad():
        for key, a in theta0.items():
            b = theta1[key]
            if not isinstance(a, Tensor):
                if a != b:
                    differing.append(key)
                out[key] = a
            elif _is_interpolable(a):
                # lerp is exact at both ends: alpha=0 gives a, alpha=1 gives b
                out[key] = torch.lerp(a.detach(), b.detach().to(device=a.device, dtype=a.dtype), alpha)
            else:
                if not torch.equal(a, b.to(a.device)):
                    differing.append(key)
                out[key] = a.detach().clone()
    if differing:
        raise CheckpointError(f"non-float entries differ between the two state dicts and cannot be interpolated: "
                              f"{_listing(differing)}")
    return out


def _parse_number(token: str, text: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ConfigError(f"alphas {text!r}: {token.strip()!r} is not a number; {_ALPHA_FORMS}") from None
    if not math.isfinite(value):
        raise ConfigError(f"alphas {text!r}: {token.strip()!r} is not finite; {_ALPHA_FORMS}")
    return value


def _parse_range(text: str) -> list[float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise ConfigError(f"alphas {text!r} is malformed; {_ALPHA_FORMS}")
    start, stop, step = (_parse_number(p, text) for p in parts)
    if step <= 0:
        raise ConfigError(f"alphas {text!r}: step must be > 0; got {step!r}")
    if stop < start:
        raise ConfigError(f"alphas {text!r}: stop {stop!r} is below start {start!r}")
    steps = (stop - start) / step + 1e-9
    if steps >= _MAX_ALPHAS:
        raise ConfigError(f"alphas {text!r} gives more than {_MAX_ALPHAS} values; use a larger step")
    count = math.floor(steps) + 1
    values = [start + i * step for i in range(count)]
    if abs(values[-1] - stop) <= 1e-9:
        values[-1] = stop
    # round away accumulation noise (0.30000000000000004 -> 0.3) so values print and key cleanly
    return [round(v, 12) for v in values]


def parse_alphas(text: str) -> list[float]:
    """Parse a WiSE-FT mixing-coefficient list.

    Forms: ``"0:1:0.1"`` (start:stop:step, stop included when it is reached within
    1e-9), ``"0,0.5,1"`` or ``"0.5"``. Whitespace is ignored.

    Returns:
        The alphas in the order given, each in [0, 1].

    Raises:
        ConfigError: Malformed text, a non-positive step, or values outside [0, 1]
            (named in the message).
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"alphas {text!r} is empty or not a string; {_ALPHA_FORMS}")
    text = text.strip()
    if ":" in text:
        values = _parse_range(text)
    else:
        values = [_parse_number(tok, text) for tok in text.split(",")]
    outside = [v for v in values if not 0.0 <= v <= 1.0]
    if outside:
        raise ConfigError(f"alphas {text!r}: {', '.join(f'{v:g}' for v in outside)} outside the valid range [0, 1]")
    return values
