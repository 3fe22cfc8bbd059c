"""Learning-rate schedules, stepped once per optimizer step.

``onecycle`` is the paper's schedule and is exactly PyTorch's ``OneCycleLR`` with its
defaults: the lr rises from ``max/25`` to ``max`` over the first ``warmup_frac`` of the
steps along a half cosine, then falls along a half cosine to ``max/25/1e4``; Adam's beta1
moves the other way, 0.95 -> 0.85 -> 0.95. ``cosine`` is a linear warm-up followed by a
cosine decay to 0, and ``constant`` a linear warm-up followed by a flat lr; neither touches
Adam's betas, which stay as the optimizer was built (0.9, 0.999: FLYP's fixed betas).
Every scheduler's ``state_dict`` holds only JSON-safe values, so it is stored in ``state.json``.

The warm-up is a fraction of the steps (``warmup_frac``, the paper's 0.02) or, when
``warmup_steps > 0``, a number of steps that replaces it (FLYP's 500):

- ``cosine`` / ``constant``: exactly ``warmup_steps`` linear warm-up steps, the lr reaching
  its peak at step ``warmup_steps - 1``; a run shorter than that ends still warming up, as
  FLYP's reference schedule does.
- ``onecycle``: ``pct_start = warmup_steps / total_steps``, so the lr peaks at step
  ``warmup_steps - 1`` too, then anneals over the rest of the run.

``OneCycleLR`` fails at the last step of a cycle whose rise fills every step
(``pct_start`` 1: a fraction of 1, or ``warmup_steps >= total_steps``); there
``pct_start`` becomes ``(total_steps - 1) / total_steps`` (the rise ends at the step before
last). Every shorter warm-up is passed unchanged.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR

from robustft.errors import ConfigError, choices_hint

__all__ = ["SCHEDULES", "WarmupDecayLR", "build_scheduler"]

SCHEDULES = ("onecycle", "cosine", "constant")


class WarmupDecayLR(LRScheduler):
    """Linear warm-up to each group's lr, then cosine decay to 0 or a constant lr.

    At step ``t`` (0-based) the factor on the base lr is ``(t + 1) / warmup_steps`` while
    ``t < warmup_steps``, then ``0.5 * (1 + cos(pi * (t - warmup_steps) / (total_steps -
    warmup_steps)))`` for ``decay="cosine"`` or 1 for ``decay="constant"``.

    Args:
        optimizer: The optimizer whose group lrs are the peak lrs.
        total_steps: Optimizer steps in the whole run (>= 1).
        warmup_steps: Steps of linear warm-up (0 disables it).
        decay: ``"cosine"`` or ``"constant"``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, decay: str) -> None:
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        """Multiplier on the peak lr at 0-based optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        scale = self.factor(self.last_epoch)
        return [base * scale for base in self.base_lrs]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_frac: float = 0.02,
    warmup_steps: int = 0,
) -> LRScheduler:
    """Build a per-iteration schedule over ``total_steps`` optimizer steps.

    Args:
        optimizer: Its current group lrs are taken as the peak lrs.
        name: One of :data:`SCHEDULES`.
        total_steps: Optimizer steps in the whole run (>= 1).
        warmup_frac: Fraction of the steps spent warming up, in ``[0, 1]`` (``pct_start``
            of ``OneCycleLR``; 0.02 in the paper).
        warmup_steps: Warm-up steps (>= 0); when > 0 they replace ``warmup_frac`` (see the
            module docstring for what they mean per schedule; FLYP warms up 500 steps).

    Returns:
        A scheduler whose ``step()`` is called after every ``optimizer.step()``.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; {choices_hint(name, SCHEDULES)}")
    if total_steps < 1:
        raise ConfigError(f"the schedule needs at least one optimizer step; got total_steps={total_steps}")
    if not 0.0 <= warmup_frac <= 1.0:
        raise ConfigError(f"warm-up fraction must lie in [0, 1]; got {warmup_frac}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"warm-up steps must be an integer >= 0 (0: use the warm-up fraction); got {warmup_steps!r}")
    if name == "onecycle":
        if warmup_steps == 1:
            raise ConfigError("the onecycle schedule needs optim.warmup_steps >= 2 (PyTorch's one-cycle rise "
                              "spans at least one step); use 2 or more, 0 for optim.warmup, or schedule cosine")
        pct = warmup_steps / total_steps if warmup_steps > 0 else warmup_frac
        if pct * total_steps == 1.0:  # the rise would end at step 0 and divide by zero inside OneCycleLR
            pct = (1.0 + 1e-6) / total_steps
        return OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=pct if pct < 1.0 else (total_steps - 1) / total_steps,
            anneal_strategy="cos",
            cycle_momentum=True,
            base_momentum=0.85,
            max_momentum=0.95,
            div_factor=25.0,
            final_div_factor=1e4,
            three_phase=False,
        )
    warmup = warmup_steps if warmup_steps > 0 else round(warmup_frac * total_steps)
    return WarmupDecayLR(optimizer, total_steps, warmup, decay=name)
