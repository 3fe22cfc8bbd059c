"""Graceful stops: SIGINT/SIGTERM request a checkpoint at the next step boundary.

Clusters preempt jobs with SIGTERM (SLURM, Kubernetes) and users press Ctrl-C. Inside
:class:`StopSignals` those signals only set a flag; the trainer checks it after each
optimizer step, saves a checkpoint and raises :class:`TrainingInterrupted`. A second
Ctrl-C while the flag is set falls through to Python's KeyboardInterrupt, for users who
really want out now.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from robustft.errors import TrainingError

__all__ = ["StopSignals", "TrainingInterrupted"]

logger = logging.getLogger(__name__)


class TrainingInterrupted(TrainingError):
    """Training stopped on a signal after saving a checkpoint; rerun with ``--resume``."""

    def __init__(self, message: str, *, step: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a stop request.

    Handlers are installed only from the main thread (Python's rule); elsewhere the
    context manager does nothing and signals keep their previous behaviour.

    Attributes:
        received: Name of the first signal received (``"SIGTERM"``), or ``None``.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop without waiting for the step
        if self.received is None:
            self.received = name
            logger.warning("%s received: saving a checkpoint at the end of this step, then stopping", name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logger.debug("not the main thread: SIGINT/SIGTERM keep their default handlers")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
