"""The training engine: optimiser, schedules, checkpoints and the shared training loop.

The loop (:func:`fit`) knows the :class:`TrainableMethod` contract, never a concrete
method; checkpoints are safetensors + JSON written atomically into the run folder.
"""

from robustft.engine.checkpoint import (
    TrainingCheckpoint,
    best_dir,
    check_writable,
    list_checkpoints,
    load_best,
    load_checkpoint,
    load_latest,
    load_module_state,
    save_best,
    save_checkpoint,
)
from robustft.engine.optim import build_optimizer, default_param_groups
from robustft.engine.schedule import SCHEDULES, build_scheduler
from robustft.engine.signals import TrainingInterrupted
from robustft.engine.trainer import TrainableMethod, TrainResult, TrainSettings, fit, per_rank_micro_batch

__all__ = [
    "SCHEDULES",
    "TrainableMethod",
    "TrainingCheckpoint",
    "TrainingInterrupted",
    "TrainResult",
    "TrainSettings",
    "best_dir",
    "build_optimizer",
    "build_scheduler",
    "check_writable",
    "default_param_groups",
    "fit",
    "list_checkpoints",
    "load_best",
    "load_checkpoint",
    "load_latest",
    "load_module_state",
    "per_rank_micro_batch",
    "save_best",
    "save_checkpoint",
]
