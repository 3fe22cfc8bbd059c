"""``kd-refill``: knowledge distillation (logits, temperature T) on refilled counterfactual images.

``L = w_task * CE(s(x), y) + w_dist * T^2 * KL(softmax(t(x_cf)/T) || softmax(s(x_cf)/T))``,
with the same counterfactual images as ``fd-refill`` (default ``ObjMaskSingleFill(0.3)``).
"""

from __future__ import annotations

from robustft.methods._counterfactual import CounterfactualDistillation
from robustft.methods.base import register_method

__all__ = ["KdRefill"]

_REFILL_KINDS = tuple(f"{r}Mask{f}Fill" for f in ("Single", "Multi") for r in ("Rand", "Obj", "Ctx"))


@register_method("kd-refill", "CE + T^2 * KL to zero-shot logits on CAM-masked, refilled counterfactual images "
                              "(default ObjMaskSingleFill(0.3))")
class KdRefill(CounterfactualDistillation):
    """Logit distillation on refilled counterfactual images (SingleFill / MultiFill strategies)."""

    masking_kinds = _REFILL_KINDS
    default_masking = "ObjMaskSingleFill(0.3)"
    distill = "kd"
