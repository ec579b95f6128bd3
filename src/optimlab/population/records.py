"""What a population member leaves in its job folder: what its own sequential job would write.

``summary.json`` (the :class:`~optimlab.summary.RunSummary` schema, diagnosed by
:func:`~optimlab.regimes.diagnose` on the member's own history, with ``population`` naming the
population it trained in) and its loggers' files (TensorBoard events: per-step and per-epoch scalars,
HPARAMS and the regime text; a CSV logger's ``metrics.csv`` and ``hparams.yaml``), so ``optimlab-report``
and ``tensorboard`` read a population sweep as they read a sequential one.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from optimlab.build import build_loggers, logger_constructors
from optimlab.curvature import show_sharpness_chart
from optimlab.population.loop import MemberRecord
from optimlab.record import close_loggers, diagnosed_summary, log_result, logged_in_fit, replay
from optimlab.regimes import Thresholds
from optimlab.summary import FINISHED, RunSummary, write_summary
from optimlab.tensorboard_logger import in_run_folder


@dataclass
class PopulationRun:
    """What the members of one population share: its name and size, the steps per epoch, timing."""

    name: str                    # "population 1 of the sweep"
    jobs: list[int]              # the members' hydra.job.num, in member order
    device: str
    dtype: str
    steps_per_epoch: int
    train_size: int
    params: int                  # per member
    first_step_s: float | None = None   # the population's first step (all members at once)
    wall_time_s: float = 0.0
    checkpoint: str | None = None       # its checkpoint file, while it has one

    def describe(self, member: int) -> dict[str, Any]:
        """The ``population`` field of member ``member``'s summary."""
        return {"name": self.name, "member": member, "members": len(self.jobs), "jobs": self.jobs,
                "device": self.device, "dtype": self.dtype, "steps_per_epoch": self.steps_per_epoch,
                "checkpoint": self.checkpoint}


def member_steps(record: MemberRecord, steps_per_epoch: int) -> int:
    """Optimizer steps the member's own run would count (Lightning's ``global_step``): a diverged run
    stops at its divergence step (a refused step is not counted; an applied one whose weights
    overflowed is, and the guard records the step after it)."""
    if record.diverged_at_step is not None:
        return record.diverged_at_step
    return len(record.history) * steps_per_epoch


def member_summary(status: str, config: dict[str, Any], record: MemberRecord, population: PopulationRun,
                   member: int, noisy_images: int, **final: Any) -> RunSummary:
    """Member ``member``'s summary as it stands, with ``status`` and the ``final`` fields given
    (``test_loss``, ``test_acc``, ``tested_checkpoint``, ``error``), as
    :meth:`~optimlab.record.RunRecord.summary` builds a single run's."""
    return diagnosed_summary(
        status, config, record.history, record.train_steps, Thresholds.from_overrides(config.get("regimes")),
        diverged=record.diverged, diverged_at_step=record.diverged_at_step, divergence_reason=record.divergence_reason,
        curvature=record.curvature, steps=member_steps(record, population.steps_per_epoch),
        first_step_s=population.first_step_s, wall_time_s=population.wall_time_s, params=population.params,
        label_noise_images=noisy_images, train_size=population.train_size, device=population.device,
        population=population.describe(member), **final)


@functools.lru_cache(maxsize=4)
def constructors_of(logger_config: str) -> dict[str, functools.partial]:
    """:func:`~optimlab.build.logger_constructors` of a ``logger`` config given as JSON: made once for each
    distinct ``logger`` config among a population's members."""
    return logger_constructors(json.loads(logger_config))


def write_logs(run_dir: Path, summary: RunSummary) -> None:
    """What the member's own run logs, where it logs it: its loggers (``logger``, as the run builds them)
    get, in the run's order, what they got during its fit (:func:`~optimlab.record.logged_in_fit`:
    per-step rows, tracked sharpness and threshold, epochs, ``callbacks.lr_monitor``'s lrs), then, for a
    finished member, the run's result (HPARAMS and the regime text, :func:`~optimlab.record.log_result`),
    and are closed. (A run's loggers are also finalized after its fit: for TensorBoard a flush, for a CSV
    logger a save, whose file holds the same rows under the same sorted header either way.) The event files
    an earlier write left in the member's own folder (the member stopped, then resumed) are removed once
    the new one, which holds all they held, is closed (a folder outside it, ``logger.tensorboard.save_dir``,
    may hold other runs' files: nothing is removed there); a new CSV logger replaces its ``metrics.csv`` itself."""
    logger_config = summary.config.get("logger") or {}
    # All of a member's events are written here at once: a queue that holds them spares the writer
    # thread's hand-offs (5.0 -> 3.2 ms a member of the narrow grid; the file is complete at close either way).
    loggers = build_loggers(logger_config, run_dir, tensorboard_queue=1000,
                            constructors=constructors_of(json.dumps(logger_config, sort_keys=True)))
    earlier = [path for logger in loggers
               if isinstance(logger, TensorBoardLogger) and in_run_folder(logger.log_dir, run_dir)
               for path in Path(logger.log_dir).glob("events.out.tfevents.*")]
    if summary.curvature:
        show_sharpness_chart(loggers)
    steps_per_epoch = (summary.population or {}).get("steps_per_epoch", 0)
    replay(loggers, logged_in_fit(summary.config, summary.epochs, summary.train_steps, summary.curvature,
                                  steps_per_epoch, summary.steps))
    finished = summary.status in FINISHED
    if finished:
        log_result(loggers, summary)
    close_loggers(loggers, "success" if finished else summary.status)
    for path in earlier:
        path.unlink(missing_ok=True)


def write_member(run_dir: Path, summary: RunSummary) -> None:
    """``summary.json``, after the loggers' files of a member that is not running: a finished one's, or an
    interrupted or crashed one's epochs so far (as its run's loggers hold them when it stops; the launcher
    writes a stopped population's members' summaries first, then their logs). A finished summary is what
    ``resume=auto`` skips, so it comes last (a kill between leaves the member to run again)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if summary.status in FINISHED or (summary.status != "running" and summary.epochs):
        try:
            write_logs(run_dir, summary)
        except Exception as err:  # the member's record says so (crashed, why), not "running"
            write_summary(run_dir, replace(summary, status="crashed", error=f"{type(err).__name__}: {err}"))
            raise
    write_summary(run_dir, summary)
