"""What training reports: a JSONL log, TensorBoard scalars and a progress bar (rank 0).

Loss terms are summed on the device over a window of ``log_every`` optimizer steps (no
host sync per step), averaged over every rank at the end of the window, then written to
``RUN/train_log.jsonl`` (one JSON object per line), to TensorBoard under ``RUN/tensorboard``
and to the tqdm bar. The window's sums are part of the checkpoint, so a resumed run logs
exactly the values an uninterrupted run would have logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from robustft.distributed import DistEnv
from robustft.safeio import atomic_write_text

__all__ = ["TrainLog", "truncate_log", "console_redirect"]

logger = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"


def console_redirect(enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """Route console log lines through tqdm while a bar is shown, so they do not break it."""
    return logging_redirect_tqdm() if enabled else contextlib.nullcontext()


def truncate_log(run_dir: str | Path, last_step: int) -> None:
    """Drop records written after ``last_step`` (and any half-written last line) before a resume."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class TrainLog:
    """Window-averaged training metrics to JSONL, TensorBoard and tqdm.

    Args:
        run_dir: The run folder.
        dist_env: Every rank accumulates; rank 0 writes.
        total_steps: Optimizer steps of the whole run (the bar's length).
        start_step: Steps already done (after a resume).
        log_every: Window length in optimizer steps.
        progress: Show the tqdm bar (rank 0 only).
        tensorboard: Write TensorBoard scalars (rank 0 only).
    """

    def __init__(
        self,
        run_dir: Path,
        dist_env: DistEnv,
        *,
        total_steps: int,
        start_step: int,
        log_every: int,
        progress: bool,
        tensorboard: bool,
    ) -> None:
        self.dist_env = dist_env
        self.log_every = max(1, log_every)
        self.total_steps = total_steps
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._images = 0
        self._t0 = time.perf_counter()
        primary = dist_env.is_primary
        self._jsonl = (run_dir / LOG_NAME).open("a", encoding="utf-8") if primary else None
        self._tb = _summary_writer(run_dir / "tensorboard") if (primary and tensorboard) else None
        self._bar = tqdm(
            total=total_steps, initial=start_step, unit="step", desc="train",
            disable=not (primary and progress), dynamic_ncols=True,
        )

    def add(self, terms: Mapping[str, torch.Tensor], images: int) -> None:
        """Add one optimizer step's loss terms (detached scalars) and its local image count."""
        for name, value in terms.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value.clone()
        self._steps += 1
        self._images += images
        self._bar.update(1)

    def tick(self) -> None:
        """Count an optimizer step that had no usable micro-batch: the bar moves, nothing is averaged."""
        self._bar.update(1)

    def due(self, step: int) -> bool:
        """Whether ``step`` closes a window (every rank must then call :meth:`emit`)."""
        return self._steps > 0 and (step % self.log_every == 0 or step == self.total_steps)

    def emit(self, step: int, epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Average the window over steps and ranks, write it, and start a new window."""
        names = sorted(self._sums)
        device = self.dist_env.device
        # torch.full fills on the device (torch.tensor(..., device=cuda) is a blocking copy); .tolist() is
        # then this window's one host sync.
        values = [self._sums[n].to(device) for n in names] + [torch.full((), float(self._images), device=device)]
        reduced = self.dist_env.all_reduce_sum(torch.stack(values)).tolist()
        world = self.dist_env.world_size
        record: dict[str, float] = {n: v / (world * self._steps) for n, v in zip(names, reduced)}
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        group = optimizer.param_groups[0]
        record.update(step=step, epoch=epoch, lr=float(group["lr"]), images_per_s=reduced[-1] / elapsed)
        if "betas" in group:
            record["beta1"] = float(group["betas"][0])
        self._write("train", record)
        shown = {n: f"{record[n]:.4g}" for n in names}
        self._bar.set_postfix(shown | {"img/s": f"{record['images_per_s']:.1f}"}, refresh=False)
        self._sums, self._steps, self._images, self._t0 = {}, 0, 0, time.perf_counter()
        return record

    def log_eval(self, step: int, epoch: int, metrics: Mapping[str, float], *, best: bool) -> None:
        """Write one validation result (rank 0)."""
        self._write("val", {**{k: float(v) for k, v in metrics.items()}, "step": step, "epoch": epoch, "best": best})

    def log_data(self, step: int, epoch: int, counts: Mapping[str, int]) -> None:
        """Write the run's unreadable-image and skipped-batch counts so far (rank 0)."""
        self._write("data", {**{k: int(v) for k, v in counts.items()}, "step": step, "epoch": epoch})

    def _write(self, kind: str, record: Mapping[str, Any]) -> None:
        if self._jsonl is not None:
            clean = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in record.items()}
            self._jsonl.write(json.dumps({"kind": kind, **clean, "time": time.time()}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            step = int(record["step"])
            for name, value in record.items():
                if name not in ("step", "epoch", "best") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{name}", value, step)

    def window_state(self) -> dict[str, Any]:
        """The open window (exact float32 sums), for the checkpoint."""
        return {"sums": {n: v.item() for n, v in self._sums.items()}, "steps": self._steps, "images": self._images}

    def load_window_state(self, state: Mapping[str, Any]) -> None:
        """Reopen the window a checkpoint captured (the image count restarts: images/s is a rate of this process)."""
        device = self.dist_env.device
        self._sums = {n: torch.tensor(v, dtype=torch.float32, device=device) for n, v in state["sums"].items()}
        self._steps, self._images = int(state["steps"]), 0

    def close(self) -> None:
        """Flush and close every sink."""
        self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer(folder: Path) -> Any:
    # Imported lazily: tensorboard is heavy and only rank 0 writes.
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))
