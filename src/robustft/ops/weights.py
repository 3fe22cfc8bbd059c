"""Weight-space averages of checkpoints of the same model (WiSE-FT, model soups).

One function mixes weights for every caller: :func:`average_state_dicts` is the weighted
mean ``sum_i w_i * theta_i`` of N compatible state dicts over every floating-point tensor,
the classification head included. :func:`interpolate_state_dicts` is its two-point case,
WiSE-FT's ``theta(alpha) = (1 - alpha) * theta0 + alpha * theta1`` (``theta0``
conventionally the zero-shot model, ``theta1`` the fine-tuned one), and
:func:`blend_into` builds a module loaded with such a mean.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from robustft.errors import CheckpointError, ConfigError

__all__ = ["assert_compatible", "average_state_dicts", "blend_into", "interpolate_state_dicts", "parse_alphas"]

logger = logging.getLogger(__name__)

_SHOWN = 8  # keys listed per category in a diff message
_MAX_ALPHAS = 10_001
_WEIGHT_TOL = 1e-6  # how far from 1 the weights of a mean may sum (float noise of n/(n+1) + 1/(n+1))
_ALPHA_FORMS = "expected 'start:stop:step' (e.g. '0:1:0.1'), a list (e.g. '0,0.5,1') or one value (e.g. '0.5')"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _is_interpolable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def assert_compatible(theta0: Mapping[str, Any], theta1: Mapping[str, Any], *, other: str = "theta1",
                      reference: str = "theta0") -> None:
    """Check that two state dicts have the same keys, shapes and kinds of tensors.

    Args:
        theta0: The reference state dict.
        theta1: The state dict checked against it.
        other: What the message calls ``theta1`` (e.g. a run's name).
        reference: What the message calls ``theta0``.

    Raises:
        CheckpointError: One line listing the keys missing from ``theta1``, the extra keys
            in ``theta1``, shape mismatches, and float-vs-integer mismatches.
    """
    problems = []
    missing = [k for k in theta0 if k not in theta1]
    extra = [k for k in theta1 if k not in theta0]
    if missing:
        problems.append(f"missing in {other}: {_listing(missing)}")
    if extra:
        problems.append(f"extra in {other}: {_listing(extra)}")
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
        head = ("the two state dicts are not from the same architecture" if (other, reference) == ("theta1", "theta0")
                else f"{other} is not from the same architecture as {reference}")
        raise CheckpointError(head + "; " + "; ".join(problems))


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"interpolation alpha = {alpha!r} is outside the valid range [0, 1]")
    return float(alpha)


def _check_weights(weights: Sequence[float], n_states: int) -> list[float]:
    if n_states == 0:
        raise ConfigError("average_state_dicts: no state dicts given; give at least one")
    if len(weights) != n_states:
        raise ConfigError(f"average_state_dicts: {len(weights)} weights for {n_states} state dicts; give one weight "
                          "per state dict")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= float(w) <= 1.0]
    if bad:
        raise ConfigError(f"average_state_dicts: weights {', '.join(map(repr, bad))} outside the valid range [0, 1]")
    values = [float(w) for w in weights]
    if abs(math.fsum(values) - 1.0) > _WEIGHT_TOL:
        raise ConfigError(f"average_state_dicts: the weights sum to {math.fsum(values):g}, not 1; a mean needs weights "
                          "that sum to 1 (e.g. 1/N each for a uniform mean)")
    return values


def _mean_tensor(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """``sum_i weights[i] * tensors[i]`` in ``tensors[0]``'s dtype and on its device."""
    first = tensors[0].detach()
    if len(tensors) == 1:
        return first.clone()
    if len(tensors) == 2:
        # WiSE-FT's two-point formula; lerp is exact at both ends: weight 0 gives the first
        # tensor, weight 1 the second, bit for bit.
        return torch.lerp(first, tensors[1].detach().to(device=first.device, dtype=first.dtype), weights[1])
    # Three or more: accumulate in at least float32 (a bf16 running sum would lose digits),
    # skipping zero weights so that (1, 0, ..., 0) returns the first tensor exactly.
    acc_dtype = torch.promote_types(first.dtype, torch.float32)
    acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for tensor, weight in zip(tensors, weights):
        if weight != 0.0:
            acc.add_(tensor.detach().to(device=first.device, dtype=acc_dtype), alpha=weight)
    return acc.to(first.dtype)


def average_state_dicts(states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """The weighted mean ``sum_i weights[i] * states[i]`` of N compatible state dicts.

    Every floating (and complex) tensor is averaged, the classification head included, in
    ``states[0]``'s dtype and on its device. Two state dicts are mixed with
    ``torch.lerp(theta0, theta1, weights[1])`` (WiSE-FT's numbers); three or more are summed
    in at least float32 and cast back. The mean is exact at the ends: weights ``(1, 0)``
    (or ``(1, 0, 0, ...)``) give the first state dict bit for bit, and a weight of 1 on any
    one state dict gives its values. Integer/bool tensors (e.g. counters) and non-tensor
    entries are taken from the first state dict and must be equal in all. The result is
    detached (no autograd graph) and shares no memory with the inputs; key order follows
    ``states[0]``.

    Args:
        states: N >= 1 state dicts with the same keys, shapes and kinds of tensors.
        weights: N weights in [0, 1] that sum to 1 (within 1e-6); ``[1/N] * N`` is the
            uniform mean (a uniform model soup).

    Raises:
        ConfigError: No state dicts, a weight count that differs from N, a weight outside
            [0, 1], or weights that do not sum to 1.
        CheckpointError: The state dicts differ in keys, shapes or kinds of tensors (the
            message names state dict ``i`` and lists the keys), or a non-float entry differs.
    """
    values = _check_weights(weights, len(states))
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if len(states) == 2:
            assert_compatible(first, state)
        else:
            assert_compatible(first, state, other=f"state dict {i}", reference="state dict 0")
    out: dict[str, Any] = {}
    differing = []
    with torch.no_grad():
        for key, a in first.items():
            column = [state[key] for state in states]
            if not isinstance(a, Tensor):
                if any(b != a for b in column[1:]):
                    differing.append(key)
                out[key] = a
            elif _is_interpolable(a):
                out[key] = _mean_tensor(column, values)
            else:
                if any(not torch.equal(a, b.to(a.device)) for b in column[1:]):
                    differing.append(key)
                out[key] = a.detach().clone()
    if differing:
        what = "the two state dicts" if len(states) == 2 else f"the {len(states)} state dicts"
        raise CheckpointError(f"non-float entries differ between {what} and cannot be averaged: {_listing(differing)}")
    return out


def interpolate_state_dicts(theta0: Mapping[str, Any], theta1: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Interpolate two compatible state dicts: ``(1 - alpha) * theta0 + alpha * theta1``.

    The two-point case of :func:`average_state_dicts` (weights ``(1 - alpha, alpha)``,
    computed as ``torch.lerp(theta0, theta1, alpha)``). Floating (and complex) tensors are
    interpolated in ``theta0``'s dtype and on its device; ``alpha = 0`` returns ``theta0``'s
    values and ``alpha = 1`` ``theta1``'s, exactly. Integer/bool tensors (e.g. counters) and
    non-tensor entries must be equal in both and are copied. The result is detached (no
    autograd graph) and shares no memory with the inputs; key order follows ``theta0``.

    Args:
        theta0: State dict at ``alpha = 0`` (e.g. zero-shot).
        theta1: State dict at ``alpha = 1`` (e.g. fine-tuned).
        alpha: Mixing coefficient in [0, 1].

    Raises:
        ConfigError: If ``alpha`` is outside [0, 1].
        CheckpointError: If the state dicts are incompatible or a non-float entry differs.
    """
    alpha = _check_alpha(alpha)
    return average_state_dicts([theta0, theta1], [1.0 - alpha, alpha])


M = TypeVar("M", bound=nn.Module)


def blend_into(template: M, states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> M:
    """A new copy of ``template`` loaded with :func:`average_state_dicts` ``(states, weights)``.

    The one way robustft builds a module from mixed weights (WiSE-FT classifiers and
    sweeps, saved curves, model soups). ``template`` (its architecture, dtype and device)
    and the inputs are left unchanged; the copy is in eval mode with gradients off.

    Args:
        template: A module of the architecture the state dicts belong to.
        states: The state dicts to mix (see :func:`average_state_dicts`).
        weights: One weight per state dict, summing to 1.

    Raises:
        ConfigError: Bad weights (see :func:`average_state_dicts`).
        CheckpointError: The state dicts do not fit each other or ``template``.
    """
    mixed = average_state_dicts(states, weights)
    assert_compatible(template.state_dict(), mixed, other="the blend", reference="the template module")
    module = copy.deepcopy(template)
    module.load_state_dict(mixed)
    return module.eval().requires_grad_(False)


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
