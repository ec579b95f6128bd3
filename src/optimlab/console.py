"""The console: the progress bar, and the handler that writes the run's lines around it, not into it.

A run's lines (epoch lines, the result) go through :mod:`logging`; Hydra's job logging
(``conf/hydra/job_logging/optimlab.yaml``) sends them to the console through
:class:`BarSafeHandler` and, with their time, to ``<run dir>/train.log``.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm


def say(line: str, file: TextIO | None = None) -> None:
    """``line`` and its newline in one write, flushed (``print`` writes the newline apart, so the lines
    of processes sharing a console, forked populations, ran into each other)."""
    stream = file or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def warn(line: str) -> None:
    """``line`` on stderr (a stopped run's notice, apart from its results on stdout), and with its time in
    the run's log file (``train.log`` holds the console's lines)."""
    say(line, sys.stderr)
    record = logging.LogRecord("optimlab.train", logging.WARNING, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class BarSafeHandler(logging.StreamHandler):
    """Writes each record with ``tqdm.write``: a progress bar on screen is cleared, the line written,
    and the bar drawn again below it (a plain print lands inside the bar's line and wraps).
    ``writing`` is set while a line is written: a run's stop on a signal waits for it
    (:class:`~optimlab.signals.StopOnSignal`), as a KeyboardInterrupt raised between ``tqdm.write``'s lock
    acquire and release made the release fail, and logging printed "--- Logging error ---" with a
    traceback (once, in a Ctrl-C test of 2026-12-06)."""

    writing = False

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            BarSafeHandler.writing = True
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)
        finally:
            BarSafeHandler.writing = False


class EpochBar(TQDMProgressBar):
    """Lightning's bar, counting epochs from 1 as the epoch lines do, with the latest step's loss
    (read only when the bar refreshes: a host sync every ``refresh_rate`` steps, not every step)."""

    def __init__(self, refresh_rate: int = 20) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.outputs: Any = None

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # Lightning's own hook draws "Epoch <0-based>" first; this draws the bar once, numbered from 1.
        bar = self.train_progress_bar
        bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", refresh=False)
        total = self.total_train_batches  # inf for an iterable of unknown length: tqdm wants None
        bar.reset(total=total if total is not None and math.isfinite(total) else None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.outputs = outputs
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: always empty here
        if self.outputs:
            metrics["loss"] = f"{float(self.outputs['loss']):.4f}"
        return metrics
