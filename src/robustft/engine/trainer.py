"""The training loop every method shares: :func:`fit`.

One loop for 1 CPU process and N GPUs: AdamW, a schedule stepped per optimizer step,
gradient accumulation (DDP synchronises only the last micro-step), gradient clipping once
per optimizer step, an optional bf16 autocast chosen once, periodic and end-of-epoch atomic
checkpoints, exact resume (weights, optimizer, schedule, data position, random states),
a graceful stop on SIGINT/SIGTERM, a guard against non-finite losses, and logs (JSONL,
TensorBoard, progress bar). The loop knows the :class:`TrainableMethod` contract, never a
concrete method; per-epoch validation is a callable passed in by the pipeline.

Unreadable images: the loader drops them from their micro-batch and counts them
(``batch["n_bad"]``). Before the forward passes of an optimizer step, one small all-reduce
sums, over processes, the step's unreadable and attempted images and, per micro-batch, how
many processes hold fewer readable images than the method needs (``min_batch_size()``). A
micro-batch that is unusable on any process is skipped on every process (no forward, no
backward), so DDP's gradient synchronisation stays matched: the last USED micro-batch
synchronises, and the loss is averaged over the used ones. A step with no usable
micro-batch leaves the weights and the optimizer untouched but still counts as a step (the
schedule advances), so step numbers, checkpoints and resume stay exact. The counts are part
of every checkpoint; above ``max_bad_fraction`` (checked at each epoch end, and as soon as
the epoch end is certain to exceed it) the run stops with a DataError listing the files,
which rank 0 also writes to ``RUN/bad_images.txt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustft.data.folder import BAD_IMAGES_FILE, check_bad_fraction, record_bad_paths
from robustft.distributed import DistEnv, no_sync
from robustft.engine.checkpoint import (
    TrainingCheckpoint,
    check_writable,
    load_checkpoint,
    load_latest,
    load_module_state,
    refuse_existing_checkpoints,
    remove_stale_temporaries,
    save_best,
    save_checkpoint,
)
from robustft.engine.optim import build_optimizer
from robustft.engine.schedule import build_scheduler
from robustft.engine.settings import TrainableMethod, TrainResult, TrainSettings, per_rank_micro_batch
from robustft.engine.signals import StopSignals, TrainingInterrupted
from robustft.engine.state import capture_rng_state, provenance, restore_rng_state, to_jsonable
from robustft.engine.train_log import TrainLog, console_redirect, truncate_log
from robustft.errors import CheckpointError, ConfigError, TrainingError, choices_hint

__all__ = [
    "TrainableMethod",
    "TrainSettings",
    "TrainResult",
    "TrainingInterrupted",
    "fit",
    "per_rank_micro_batch",
]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
EvaluateFn = Callable[[int], Mapping[str, float]]


def fit(
    method: nn.Module,
    train_loader: Iterable[Batch],
    settings: TrainSettings,
    *,
    run_dir: str | Path,
    dist_env: DistEnv | None = None,
    resume: bool = False,
    evaluate: EvaluateFn | None = None,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    on_step_end: Callable[[int], None] | None = None,
    bad_images_file: str | Path | None = None,
) -> TrainResult:
    """Train ``method`` on ``train_loader``; see the module docstring.

    Args:
        method: A :class:`TrainableMethod`, already built with its weights.
        train_loader: Batches ``{"image": [b, 3, H, W] in [0, 1], "label": [b], "index": [b]}``
            of this rank (``b`` = per-rank micro-batch, see :func:`per_rank_micro_batch`);
            needs ``len()``. A ``loader.sampler.set_epoch(epoch, skip=items)`` is called per
            epoch when present; without one a mid-epoch resume replays and drops batches.
        settings: Optimiser, schedule and checkpoint settings.
        run_dir: Run folder for checkpoints, ``best/``, ``train_log.jsonl``, ``tensorboard/``.
        dist_env: This process's place in the job (one CPU process when None).
        resume: Continue from the newest readable checkpoint (fresh start when none).
        evaluate: Called on every rank after each epoch with the 0-based epoch index;
            returns metrics (``settings.select_metric`` picks the best epoch).
        progress: Show a progress bar on rank 0.
        config: The run's resolved config, embedded in every checkpoint.
        on_step_end: Called with the step number after every optimizer step (tests, hooks).
        bad_images_file: Where rank 0 lists the unreadable training images, one path per
            line (default ``run_dir/bad_images.txt``); the paths come from
            ``train_loader.dataset.bad_paths()`` when the dataset records them.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM arrived; a checkpoint was saved first.
        TrainingError: Non-finite loss or gradient (weights of the last good step are kept),
            or another rank failed.
        CheckpointError: The run folder is unwritable, or resume found only bad checkpoints.
        DataError: More than ``settings.max_bad_fraction`` of the training images were unreadable.
    """
    run = _Run(method, train_loader, settings, dist_env or DistEnv(), Path(run_dir), evaluate, config, on_step_end,
               None if bad_images_file is None else Path(bad_images_file))
    with StopSignals() as signals, console_redirect(progress and run.dist.is_primary):
        try:
            run.prepare(resume, progress)
            return run.train(signals)
        finally:
            run.close()


class _Run:
    """The state of one :func:`fit` call, split into named steps."""

    def __init__(self, method: nn.Module, loader: Iterable[Batch], settings: TrainSettings, dist_env: DistEnv,
                 run_dir: Path, evaluate: EvaluateFn | None, config: Mapping[str, Any] | None,
                 on_step_end: Callable[[int], None] | None, bad_file: Path | None = None) -> None:
        _check_method(method, dist_env)
        self.method, self.loader, self.s, self.dist, self.run_dir = method, loader, settings, dist_env, run_dir
        self.evaluate, self.config, self.on_step_end = evaluate, dict(config or {}), on_step_end
        self._set_epoch(0, 0)
        n_batches = len(loader)  # type: ignore[arg-type]
        if n_batches < settings.accum_steps:
            raise ConfigError(f"the training loader yields {n_batches} batches per epoch, fewer than "
                              f"accum_steps={settings.accum_steps}; use a smaller batch or fewer accumulation steps")
        if n_batches % settings.accum_steps:
            logger.warning("%d trailing micro-batches per epoch are dropped (not a multiple of accum_steps=%d)",
                           n_batches % settings.accum_steps, settings.accum_steps)
        self.steps_per_epoch = n_batches // settings.accum_steps
        self.total_steps = max(1, round(settings.epochs * self.steps_per_epoch))
        self.step = self.epoch = self.epoch_step = 0
        self.best: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = None
        self.log: TrainLog | None = None
        # Over every process and epoch so far; identical on every rank (all-reduced) and checkpointed.
        self.counts = {"n_images": 0, "n_bad_images": 0, "skipped_micro_batches": 0, "skipped_steps": 0}
        self.bad_file = bad_file or run_dir / BAD_IMAGES_FILE
        self.epoch_steps = self.steps_per_epoch
        hook = getattr(method, "min_batch_size", None)
        self.min_batch = max(1, int(hook())) if callable(hook) else 1
        self.autocast: Any = (torch.autocast(dist_env.device.type, dtype=torch.bfloat16)
                              if settings.precision == "bf16" else contextlib.nullcontext())

    @property
    def _log(self) -> TrainLog:
        """The run's log; it exists once :meth:`prepare` has run."""
        if self.log is None:
            raise RuntimeError("the training log is created by prepare(); call it before training")
        return self.log

    # ---------------------------------------------------------------- set-up
    def prepare(self, resume: bool, progress: bool) -> None:
        """Check the folder, load a checkpoint, wrap in DDP, build optimizer and schedule."""
        trainable = self.method.trainable_module()  # type: ignore[operator]
        need = 3 * sum(t.numel() * t.element_size() for t in trainable.state_dict().values())
        self.dist.on_primary(lambda: self._prepare_folder(resume, need))
        ckpt = self._find_checkpoint() if resume else None
        self.method.to(self.dist.device)
        if ckpt is not None:
            load_module_state(trainable, ckpt.model, source=str(ckpt.path / "model.safetensors"))
        self.wrapped = self.dist.wrap_ddp(
            trainable, find_unused_parameters=bool(getattr(self.method, "find_unused_parameters", False)))
        if hasattr(self.method, "set_ddp_module"):
            self.method.set_ddp_module(self.wrapped)  # type: ignore[operator]
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        s = self.s
        groups = self.method.param_groups(s.weight_decay)  # type: ignore[operator]
        self.optimizer = build_optimizer(groups, lr=s.lr, weight_decay=s.weight_decay, betas=s.betas, eps=s.eps)
        self.scheduler = build_scheduler(self.optimizer, s.schedule, self.total_steps, s.warmup_frac,
                                         s.warmup_steps)
        if ckpt is not None:
            self._restore(ckpt)
        else:
            _seed_everything(self.dist.rank_seed(s.seed))
        self.dist.on_primary(lambda: truncate_log(self.run_dir, self.step))
        self.log = TrainLog(self.run_dir, self.dist, total_steps=self.total_steps, start_step=self.step,
                            log_every=s.log_every, progress=progress, tensorboard=s.tensorboard)
        self.method.train()
        logger.info("training %d optimizer steps (%d per epoch, %g epochs) from step %d on %d process(es)",
                    self.total_steps, self.steps_per_epoch, s.epochs, self.step, self.dist.world_size)

    def _prepare_folder(self, resume: bool, need_bytes: int) -> None:
        check_writable(self.run_dir, need_bytes)
        remove_stale_temporaries(self.run_dir)
        if not resume:  # the pipeline checks this before loading anything; a safety net for other callers
            refuse_existing_checkpoints(self.run_dir)

    def _find_checkpoint(self) -> TrainingCheckpoint | None:
        found: list[TrainingCheckpoint | None] = [None]

        def newest() -> str | None:
            found[0] = load_latest(self.run_dir)
            return None if found[0] is None else str(found[0].path)

        path = self.dist.on_primary(newest)
        if path is None:
            logger.warning("resume requested but %s has no checkpoint; starting from step 0", self.run_dir)
            return None
        logger.info("resuming from %s", path)
        return found[0] if self.dist.is_primary else load_checkpoint(path)

    def _restore(self, ckpt: TrainingCheckpoint) -> None:
        state = ckpt.state
        for key, have in (("steps_per_epoch", self.steps_per_epoch), ("total_steps", self.total_steps)):
            if state.get(key) != have:
                raise CheckpointError(f"{ckpt.path} was written with {key}={state.get(key)} but this run has {have}; "
                                      "did the dataset, batch size, accumulation or epochs change?")
        try:
            self.optimizer.load_state_dict(ckpt.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])
            ranks = state["rank_states"]
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt.path} does not fit this run's optimizer or schedule: {exc}") from None
        self.best, self.history = state.get("best"), list(state.get("history", []))
        saved = state.get("data_counts") or {}
        self.counts.update({k: int(saved[k]) for k in self.counts if k in saved})
        if len(ranks) != self.dist.world_size:
            logger.warning("checkpoint written by %d process(es), resuming on %d: random streams are reseeded, "
                           "so results will not match an uninterrupted run exactly", len(ranks), self.dist.world_size)
        self.pending = ranks[self.dist.rank] if self.dist.rank < len(ranks) else None
        self.last_checkpoint = ckpt.path

    def _restore_pending(self) -> None:
        state, self.pending = self.pending, None
        if state is None:
            return
        restore_rng_state(state["rng"])
        if hasattr(self.method, "load_extra_state"):
            self.method.load_extra_state(state.get("method") or {})  # type: ignore[operator]
        if self.log is not None:
            self.log.load_window_state(state["log_window"])

    # ---------------------------------------------------------------- the loop
    def train(self, signals: StopSignals) -> TrainResult:
        """Run epochs until ``total_steps``; returns the result."""
        self.signals = signals
        with self.dist.peer_failures("a training step"):
            while self.step < self.total_steps:
                self._run_epoch()
        if signals.received:
            logger.warning("%s arrived after the last optimizer step; training is complete and its final checkpoint "
                           "is saved", signals.received)
        return TrainResult(
            step=self.step, epoch=self.epoch, history=self.history, last_checkpoint=self.last_checkpoint,
            best_metric=None if self.best is None else self.best["value"],
            best_step=None if self.best is None else self.best["step"],
            best_dir=None if self.best is None else self.run_dir / "best", **self.counts,
        )

    def _run_epoch(self) -> None:
        steps = min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)
        self.epoch_steps = steps
        batches = self._epoch_batches()
        while self.epoch_step < steps:
            micro = [self._next(batches) for _ in range(self.s.accum_steps)]
            stop = self._optimizer_step(micro)
            self.step += 1
            self.epoch_step += 1
            self._after_step(last_in_epoch=self.epoch_step == steps, stop=stop)
        self._end_epoch()

    def _epoch_batches(self) -> Iterator[Batch]:
        """This epoch's batches, positioned after those an interrupted run already used."""
        done = self.epoch_step * self.s.accum_steps
        if done == 0:
            self._restore_pending()  # random state as at the epoch boundary, before any draw
        skipped = self._set_epoch(self.epoch, done)
        batches = iter(self.loader)
        for _ in range(0 if skipped else done):
            self._next(batches)
        self._restore_pending()  # mid-epoch: after the replay, which may consume random numbers
        return batches

    def _set_epoch(self, epoch: int, skip_batches: int) -> bool:
        """Tell the sampler the epoch; True when it skipped ``skip_batches`` itself."""
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if set_epoch is None:
            return skip_batches == 0
        batch_size = getattr(self.loader, "batch_size", None)
        if skip_batches == 0 or not batch_size:
            set_epoch(epoch)
            return skip_batches == 0
        try:
            set_epoch(epoch, skip=skip_batches * batch_size)
        except TypeError:  # a sampler without skip support: replay instead
            set_epoch(epoch)
            return False
        return True

    def _next(self, batches: Iterator[Batch]) -> Batch:
        try:
            return next(batches)
        except StopIteration:
            raise TrainingError(f"the training loader ran out of batches in epoch {self.epoch} before its "
                                f"reported length ({len(self.loader)})") from None  # type: ignore[arg-type]

    def _optimizer_step(self, micro: list[Batch]) -> bool:
        """Forward/backward every usable micro-batch, check, clip, step; True when a stop was requested."""
        micro = self._usable(micro)
        n = len(micro)
        terms: dict[str, Tensor] = {}
        images = 0
        for i, batch in enumerate(micro):
            batch = _to_device(batch, self.dist.device)
            with no_sync(self.wrapped) if i < n - 1 else contextlib.nullcontext():
                with self.autocast:
                    out = self.method(batch)
                (out["loss"] / n).backward()
            for name, value in _loss_terms(out).items():
                terms[name] = terms[name] + value / n if name in terms else value / n
            images += int(batch["image"].shape[0])
        norm = None
        if self.s.clip_grad_norm > 0 and n:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.s.clip_grad_norm)
        stop = self._check(terms, norm)
        if n:
            self.optimizer.step()
            self.scheduler.step()
        else:
            self._skip_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        if n:
            self._log.add(terms, images)
        else:
            self._log.tick()
        return stop

    def _usable(self, micro: list[Batch]) -> list[Batch]:
        """The micro-batches usable on EVERY process; counts unreadable images (one all-reduce)."""
        sizes = [int(batch["image"].shape[0]) for batch in micro]
        n_bad = sum(int(batch.get("n_bad", 0)) for batch in micro)
        local = [float(size < self.min_batch) for size in sizes] + [float(n_bad), float(sum(sizes) + n_bad)]
        device = self.dist.device if self.dist.is_distributed else torch.device("cpu")
        reduced = self.dist.all_reduce_sum(torch.tensor(local, dtype=torch.float64, device=device)).tolist()
        unusable, step_bad, step_images = reduced[: len(micro)], int(reduced[-2]), int(reduced[-1])
        self.counts["n_bad_images"] += step_bad
        self.counts["n_images"] += step_images
        for i, (size, flag) in enumerate(zip(sizes, unusable)):
            if not flag:
                continue
            self.counts["skipped_micro_batches"] += 1
            mine = size < self.min_batch
            if mine or self.dist.is_primary:
                why = (f"this process has {size} readable image(s) and the method needs at least {self.min_batch}"
                       if mine else "another process's has too few readable images")
                logger.warning("step %d: micro-batch %d of %d skipped on every process: %s", self.step + 1, i + 1,
                               len(micro), why)
        if step_bad:
            self._check_bad_early(step_images)
        return [batch for batch, flag in zip(micro, unusable) if not flag]

    def _skip_optimizer_step(self) -> None:
        """No process had a usable micro-batch: weights and optimizer stay, the schedule advances."""
        self.counts["skipped_steps"] += 1
        logger.warning("step %d: no usable micro-batch on any process; the weights are not updated this step",
                       self.step + 1)
        with warnings.catch_warnings():  # PyTorch warns when the schedule moves before any optimizer step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()

    # ---------------------------------------------------------------- unreadable images
    def _over_limit(self, n_bad: int, n_images: int) -> bool:
        limit = self.s.max_bad_fraction
        return limit is not None and n_images > 0 and n_bad / n_images > limit

    def _check_bad_early(self, step_images: int) -> None:
        """Stop now when the epoch-end check is already certain to fail.

        Every step of a drop-last loader reads the same number of images, so the epoch end
        will have seen at most ``step_images`` per remaining step more; unreadable ones only add up.
        """
        left = max(0, self.epoch_steps - self.epoch_step - 1)
        if self._over_limit(self.counts["n_bad_images"], self.counts["n_images"] + left * step_images):
            self._check_bad_images()

    def _bad_paths(self) -> list[str]:
        """Every process's unreadable training files, merged into ``bad_file`` by rank 0; the full list."""
        source = getattr(getattr(self.loader, "dataset", None), "bad_paths", None)
        mine = [str(p) for p in source()] if callable(source) else []
        merged = sorted({p for part in self.dist.all_gather_object(mine) for p in part})
        return list(self.dist.on_primary(lambda: record_bad_paths(self.bad_file, merged)))

    def _check_bad_images(self) -> None:
        """Apply ``max_bad_fraction`` to the counts so far and report them (every rank calls this)."""
        c = self.counts
        if not (c["n_bad_images"] or c["skipped_micro_batches"]):
            return
        paths = self._bad_paths() if c["n_bad_images"] else []
        if self.dist.is_primary:
            self._log.log_data(self.step, self.epoch, c)
        if self._over_limit(c["n_bad_images"], c["n_images"]):
            check_bad_fraction(c["n_bad_images"], c["n_images"], float(self.s.max_bad_fraction), paths,
                               what="training set", setting="data.max_bad_fraction", listing=self.bad_file)
        if self.dist.is_primary:
            logger.warning("training set, epoch %d: %d of %d images unreadable so far (skipped%s), %d micro-batch(es) "
                           "and %d optimizer step(s) skipped%s", self.epoch, c["n_bad_images"], c["n_images"],
                           f"; listed in {self.bad_file}" if paths else "", c["skipped_micro_batches"],
                           c["skipped_steps"], "" if self.s.max_bad_fraction is None else
                           f"; limit {100 * self.s.max_bad_fraction:.3f}%")

    def _check(self, terms: Mapping[str, Tensor], norm: Tensor | None) -> bool:
        """One all-reduce per step: any rank non-finite -> error; any rank signalled -> stop."""
        if "loss" in terms:
            bad = ~torch.isfinite(terms["loss"])
        else:  # no usable micro-batch this step (on every rank alike)
            bad = torch.tensor(False, device=self.dist.device)
        if norm is not None:
            bad = bad | ~torch.isfinite(norm)
        # new_full fills on the device; torch.tensor(..., device=cuda) would be a blocking copy (a host sync).
        signalled = bad.new_full((), float(self.signals.received is not None), dtype=torch.float)
        flags = torch.stack([bad.float(), signalled])
        nonfinite, stop = self.dist.all_reduce_sum(flags).tolist()
        if nonfinite:
            shown = ", ".join(f"{k}={v.item():.6g}" for k, v in terms.items())
            grad = f", gradient norm={norm.item():.6g}" if norm is not None else ""
            kept = self.last_checkpoint.name if self.last_checkpoint else "none yet"
            raise TrainingError(
                f"non-finite loss or gradient at step {self.step + 1} (epoch {self.epoch}) on "
                f"{int(nonfinite)} process(es); this rank: {shown}{grad}; weights were not updated; last good "
                f"checkpoint: {kept} (lower the learning rate or use precision fp32, then resume)"
            )
        return bool(stop)

    def _after_step(self, *, last_in_epoch: bool, stop: bool) -> None:
        if self._log.due(self.step):
            self._log.emit(self.step, self.epoch, self.optimizer)
        every = self.s.checkpoint_every
        saved = bool(every) and self.step % every == 0 and not last_in_epoch
        if saved:
            self._save()
        if stop:
            if not saved:
                self._save()
            where = self.last_checkpoint
            raise TrainingInterrupted(
                f"training stopped by a signal after step {self.step} of {self.total_steps}; checkpoint saved to "
                f"{where}; continue with the same command plus --resume (robustft train ... --resume)",
                step=self.step, checkpoint=None if where is None else str(where),
            )
        if self.on_step_end is not None:
            self.on_step_end(self.step)

    def _end_epoch(self) -> None:
        self._check_bad_images()
        if self.evaluate is not None:
            metrics = self.dist.broadcast_object(dict(self.evaluate(self.epoch)))
            self.method.train()  # evaluation may have switched the student to eval mode
            self._record_eval(metrics)
        self.epoch += 1
        self.epoch_step = 0
        self._save()

    def _record_eval(self, metrics: Mapping[str, Any]) -> None:
        key = self.s.select_metric
        if key not in metrics:
            raise ConfigError(f"evaluation returned no {key!r} to select the best epoch; {choices_hint(key, metrics)}")
        value = float(metrics[key])
        is_best = math.isfinite(value) and (self.best is None or value > self.best["value"])
        record = {**{k: float(v) for k, v in metrics.items()}, "epoch": self.epoch, "step": self.step}
        self.history.append(record)
        if is_best:
            self.best = {"metric": key, "value": value, "step": self.step, "epoch": self.epoch}
            weights = self.method.trainable_module().state_dict()  # type: ignore[operator]
            meta = {**self.best, "metrics": record, "config": self.config}
            self.dist.on_primary(lambda: save_best(self.run_dir, weights, meta))
        if self.dist.is_primary:
            self._log.log_eval(self.step, self.epoch, metrics, best=is_best)
            logger.info("epoch %d: %s = %.4f%s", self.epoch, key, value, " (best so far)" if is_best else "")

    def _save(self) -> None:
        extra = self.method.extra_state() if hasattr(self.method, "extra_state") else {}  # type: ignore[operator]
        mine = {"rng": capture_rng_state(), "method": to_jsonable(extra), "log_window": self._log.window_state()}
        ranks = self.dist.all_gather_object(mine)
        state = {
            "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "world_size": self.dist.world_size, "accum_steps": self.s.accum_steps,
            "scheduler": self.scheduler.state_dict(), "rank_states": ranks, "best": self.best,
            "history": self.history, "config": self.config, "data_counts": dict(self.counts), **provenance(),
        }
        if self.counts["n_bad_images"]:  # the list of files goes with the counts
            self._bad_paths()
        trainable = self.method.trainable_module()  # type: ignore[operator]
        path = self.dist.on_primary(lambda: str(save_checkpoint(
            self.run_dir, self.step, trainable.state_dict(), self.optimizer.state_dict(), state,
            keep_last=self.s.keep_last)))
        self.last_checkpoint = Path(path)

    # ---------------------------------------------------------------- helpers
    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if hasattr(self.method, "set_ddp_module"):
            self.method.set_ddp_module(None)  # type: ignore[operator]


def _check_method(method: nn.Module, dist_env: DistEnv) -> None:
    if getattr(method, "trains", True) is False:
        raise ConfigError(f"method {getattr(method, 'name', type(method).__name__)!r} is evaluation-only; "
                          "there is nothing to train")
    needed = ["trainable_module", "param_groups"] + (["set_ddp_module"] if dist_env.is_distributed else [])
    missing = [name for name in needed if not callable(getattr(method, name, None))]
    if missing:
        raise TypeError(f"{type(method).__name__} lacks {', '.join(missing)} of the TrainableMethod contract")


def _loss_terms(out: Mapping[str, Any]) -> dict[str, Tensor]:
    if "loss" not in out:
        raise TrainingError(f"the method's forward returned no 'loss' (keys: {sorted(out)})")
    return {k: v.detach().float() for k, v in out.items()
            if k != "logits" and isinstance(v, Tensor) and v.ndim == 0}


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
