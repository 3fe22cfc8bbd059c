"""``fd-tokendrop``: feature distillation with MAE-style token dropping (RandMaskNoFill).

A random ``int(N * (1 - r))`` of the patch tokens (plus CLS) is kept after the positional
embedding, the SAME tokens for teacher and student:
``L = w_task * CE(head(f_s(x)), y) + w_dist * MSE(f_s(x, keep), f_t(x, keep))``.
"""

from __future__ import annotations

from robustft.methods._counterfactual import CounterfactualDistillation
from robustft.methods.base import register_method

__all__ = ["FdTokenDrop"]


@register_method("fd-tokendrop", "CE + MSE to zero-shot features with random patch tokens dropped MAE-style "
                                 "(RandMaskNoFill, default 0.75)")
class FdTokenDrop(CounterfactualDistillation):
    """Feature distillation on token-dropped inputs; accepts ``RandMaskNoFill(r)`` only."""

    masking_kinds = ("RandMaskNoFill",)
    default_masking = "RandMaskNoFill(0.75)"
    distill = "fd"
