"""Regulariser ``l2sp``: squared distance to the starting weights (L2-SP, Li et al., ICML 2018).

``L_l2sp = sum_p ||theta_p - theta0_p||^2`` over every trainable parameter of the method,
the head included, with ``theta0`` the weights when the method was built (the zero-shot
model, or the probed one in a later stage). As the LP-FT reference code does it for CLIP:
no 1/2 factor, one weight for backbone and head, ``method.l2sp_weight`` 0.01; added to the
loss, so AdamW rescales its gradient like any other term's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from robustft.methods.objective import ComposedMethod, Regulariser, Step, register_regulariser

__all__ = ["L2SP"]


@register_regulariser
class L2SP(Regulariser):
    """Pulls every trainable weight towards its value at the start of fine-tuning."""

    key = "l2sp"
    log_name = "loss_l2sp"
    description = "squared L2 distance of every trainable weight (head included) to its starting value"
    weight_option = "l2sp_weight"

    def __init__(self, method: ComposedMethod) -> None:
        super().__init__(method)
        self._names: list[str] = []

    def configure_trainable(self) -> None:
        # Runs after the task objective chose what trains: anchor exactly those weights.
        for i, _ in enumerate(self._names):
            delattr(self, f"anchor_{i}")
        params = [(n, p) for n, p in self.method.trainable_module().named_parameters() if p.requires_grad]
        self._names = [n for n, _ in params]
        for i, (_, p) in enumerate(params):
            # Not persistent: the start is rebuilt identically on resume, and checkpoints stay small.
            self.register_buffer(f"anchor_{i}", p.detach().clone(), persistent=False)

    def forward(self, step: Step) -> Tensor:
        params = dict(self.method.trainable_module().named_parameters())
        total = torch.zeros((), device=step.images.device, dtype=torch.float32)
        for i, name in enumerate(self._names):
            anchor = getattr(self, f"anchor_{i}")
            total = total + (params[name].float() - anchor.float()).pow(2).sum()
        return total
