"""The training contract and settings: what a method must offer, how to train, what comes back.

:class:`TrainableMethod` is the interface the loop relies on (methods implement it);
:class:`TrainSettings` holds the optimiser/schedule/checkpoint settings with their
validation; :func:`per_rank_micro_batch` splits a global batch over ranks and accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from robustft.engine.schedule import SCHEDULES
from robustft.errors import ConfigError, choices_hint

__all__ = ["PRECISIONS", "TrainableMethod", "TrainSettings", "TrainResult", "per_rank_micro_batch"]

PRECISIONS = ("fp32", "bf16")
Batch = Mapping[str, Any]


@runtime_checkable
class TrainableMethod(Protocol):
    """What :func:`fit` needs from a method (an ``nn.Module``).

    - ``trainable_module()``: the module that trains (the student); the only part the
      trainer checkpoints and wraps in DDP. A frozen teacher must live outside it.
    - ``param_groups(weight_decay)``: AdamW groups over trainable parameters only.
    - ``set_ddp_module(wrapped)``: the trainer hands over ``dist_env.wrap_ddp(trainable)``
      before training and ``None`` afterwards. Every student pass whose output reaches the
      loss must go through it (``wrapped(x)`` for ``forward``, ``ddp_call(wrapped, name,
      ...)`` for other entry points); with one process ``wrapped`` is the module itself.
      Store it without registering a submodule (``object.__setattr__``).
    - ``forward(batch)`` (called as ``method(batch)``): ``{"loss": scalar with autograd,
      "logits": [B, C], ...}``; every other 0-d tensor is a loss term to log.
    - ``extra_state()`` / ``load_extra_state(state)``: per-rank state a resume needs
      besides the weights (generator states), tensors or JSON values; optional.
    - ``min_batch_size()``: fewest images ``forward`` accepts (1 when absent); a micro-batch
      left with fewer by unreadable images is skipped on every process; optional.
    - ``train(mode)``: must keep a frozen teacher in eval mode.
    """

    def trainable_module(self) -> nn.Module: ...

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]: ...

    def set_ddp_module(self, wrapped: nn.Module | None) -> None: ...

    def __call__(self, batch: Batch) -> Mapping[str, Tensor]: ...


@dataclass
class TrainSettings:
    """How to train (the paper's recipe by default).

    Attributes:
        epochs: Passes over the training set (> 0; fractions allowed).
        lr: Peak learning rate. weight_decay: AdamW decoupled weight decay.
        betas, eps: AdamW's; one-cycle cycles beta1 0.95 -> 0.85 -> 0.95 over them, cosine and
            constant keep them fixed.
        schedule: One of ``onecycle``, ``cosine``, ``constant``; stepped per optimizer step.
        warmup_frac: Fraction of all steps spent warming up, in [0, 1].
        warmup_steps: Warm-up steps (>= 0); when > 0 they replace ``warmup_frac``
            (``build_scheduler`` says what they mean per schedule).
        clip_grad_norm: Max global gradient norm per optimizer step (0 disables).
        accum_steps: Micro-batches per optimizer step.
        precision: ``fp32`` or ``bf16`` (autocast of the forward pass).
        checkpoint_every: Optimizer steps between checkpoints (0: end of each epoch only).
        keep_last: Newest checkpoints kept. log_every: Optimizer steps per log record.
        seed: Seeds the global random state at a fresh start (offset by rank).
        select_metric: Key of the ``evaluate`` result that picks the best epoch (higher wins).
        tensorboard: Write TensorBoard scalars.
        max_bad_fraction: Largest tolerated fraction of unreadable training images, counted
            over every process and epoch, in [0, 1]; more stops the run with a DataError
            listing them. None tolerates any number (they are still counted and reported).
    """

    epochs: float = 10.0
    lr: float = 3e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "onecycle"
    warmup_frac: float = 0.02
    warmup_steps: int = 0
    clip_grad_norm: float = 1.0
    accum_steps: int = 1
    precision: str = "fp32"
    checkpoint_every: int = 0
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    select_metric: str = "top1"
    tensorboard: bool = True
    max_bad_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; {choices_hint(self.schedule, SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; {choices_hint(self.precision, PRECISIONS)}")
        checks = [
            ("epochs", self.epochs > 0, "> 0"), ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"), ("warmup_frac", 0 <= self.warmup_frac <= 1, "in [0, 1]"),
            ("warmup_steps", isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool)
             and self.warmup_steps >= 0, "an integer >= 0 (0: use warmup_frac)"),
            ("clip_grad_norm", self.clip_grad_norm >= 0, ">= 0 (0 disables)"),
            ("accum_steps", self.accum_steps >= 1, ">= 1"), ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("keep_last", self.keep_last >= 1, ">= 1"), ("log_every", self.log_every >= 1, ">= 1"),
        ]
        if self.max_bad_fraction is not None:
            checks.append(("max_bad_fraction", 0 <= self.max_bad_fraction <= 1, "in [0, 1] (or None: no limit)"))
        for name, ok, rule in checks:
            if not ok or (isinstance(getattr(self, name), float) and not math.isfinite(getattr(self, name))):
                raise ConfigError(f"training setting {name} = {getattr(self, name)!r} must be {rule}")


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        step: Optimizer steps completed. epoch: Epochs completed.
        best_metric: Best value of ``select_metric`` (None without ``evaluate``).
        best_step: Step of the best epoch; its weights are in ``best_dir``.
        history: One dict per evaluated epoch (``epoch``, ``step``, the metrics).
        best_dir: ``RUN/best`` or None. last_checkpoint: The newest checkpoint folder.
        n_images: Training images attempted over every process and epoch (readable + not).
        n_bad_images: Of those, the unreadable ones (skipped).
        skipped_micro_batches: Micro-batches skipped on every process because one process's
            had fewer readable images than the method needs.
        skipped_steps: Optimizer steps without any usable micro-batch (the weights stayed put).
    """

    step: int
    epoch: int
    best_metric: float | None
    best_step: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_dir: Path | None = None
    last_checkpoint: Path | None = None
    n_images: int = 0
    n_bad_images: int = 0
    skipped_micro_batches: int = 0
    skipped_steps: int = 0


def per_rank_micro_batch(global_batch: int, world_size: int, accum_steps: int) -> int:
    """Images per rank per micro-step for a global batch; ConfigError when it does not divide."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ConfigError(f"global batch size must be a positive integer; got {global_batch!r}")
    if world_size < 1 or accum_steps < 1:
        raise ConfigError(f"world size ({world_size}) and accumulation steps ({accum_steps}) must be >= 1")
    parts = world_size * accum_steps
    if global_batch % parts:
        lower = max(parts, global_batch // parts * parts)
        raise ConfigError(
            f"global batch size {global_batch} is not divisible by world size {world_size} x accumulation steps "
            f"{accum_steps} = {parts}; use a multiple of {parts} (e.g. {lower} or {lower + parts})"
        )
    return global_batch // parts
