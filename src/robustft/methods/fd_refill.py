"""``fd-refill``: the paper's method. Feature distillation on masked-and-refilled images.

``L = w_task * CE(head(f_s(x)), y) + w_dist * MSE(f_s(x_cf), stopgrad f_t(x_cf))`` where
``x_cf`` replaces the object (or context, or random) patches of each image by the same
patches of other images of the batch, chosen by the ground-truth class's CAM. Default
``ObjMaskSingleFill(0.3)`` with the student's MMCAM (the reference implementation's
choice); ``cam_source="teacher"`` uses the frozen model (cacheable, see ``cam_cache``).
The step itself is :class:`robustft.methods._counterfactual.CounterfactualDistillation`.
"""

from __future__ import annotations

from robustft.methods._counterfactual import CounterfactualDistillation
from robustft.methods.base import register_method

__all__ = ["FdRefill"]

_REFILL_KINDS = tuple(f"{r}Mask{f}Fill" for f in ("Single", "Multi") for r in ("Rand", "Obj", "Ctx"))


@register_method("fd-refill", "the paper's method: CE + MSE to zero-shot features on CAM-masked, refilled "
                              "counterfactual images (default ObjMaskSingleFill(0.3))")
class FdRefill(CounterfactualDistillation):
    """Feature distillation on refilled counterfactual images (SingleFill / MultiFill strategies)."""

    masking_kinds = _REFILL_KINDS
    default_masking = "ObjMaskSingleFill(0.3)"
    distill = "fd"
