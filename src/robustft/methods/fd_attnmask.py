"""``fd-attnmask``: feature distillation with attention to masked patches blocked (Obj/CtxMaskNoFill).

The CAM picks object (or context) patches; in every layer of BOTH models no token may
attend to them (a boolean key mask; the tokens still exist):
``L = w_task * CE(head(f_s(x)), y) + w_dist * MSE(f_s(x, mask), f_t(x, mask))``.
"""

from __future__ import annotations

from robustft.methods._counterfactual import CounterfactualDistillation
from robustft.methods.base import register_method

__all__ = ["FdAttnMask"]


@register_method("fd-attnmask", "CE + MSE to zero-shot features with attention to CAM-selected patches blocked "
                                "in every layer (ObjMaskNoFill(0.3) / CtxMaskNoFill)")
class FdAttnMask(CounterfactualDistillation):
    """Feature distillation under an attention key mask; accepts ``ObjMaskNoFill`` / ``CtxMaskNoFill``."""

    masking_kinds = ("ObjMaskNoFill", "CtxMaskNoFill")
    default_masking = "ObjMaskNoFill(0.3)"
    distill = "fd"
