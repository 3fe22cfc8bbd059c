"""Where robustft leaves the autocast dtype: regions that always compute in float32.

Under ``optim.precision: bf16`` the training step and evaluation run inside
``torch.autocast(dtype=bfloat16)``, which recasts the inputs of matmuls (``@``, ``bmm``,
``linear``, ``einsum``) to bf16 whatever their dtype. The few places whose numbers must
keep float32's 24-bit mantissa (the CAM rollout, the final projection and the classifier
head) run inside :func:`float32_region`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["float32_region"]


def float32_region(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off for ``device``'s type (a no-op where autocast does not exist).

    Inside, every op computes in the dtype of its inputs; cast them to float32 first.
    Without an enclosing autocast this changes nothing, bit for bit.
    """
    kind = torch.device(device).type
    if torch.amp.is_autocast_available(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
