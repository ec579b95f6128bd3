"""The TensorBoard logger of a run (``logger=tensorboard``): Lightning's, with one event file per
run and a landing view that opens on the curves.

Lightning finalizes its loggers at the end of ``fit`` and again of ``test``; its TensorBoard logger
closes the writer there, and the next write opens a new event file (three per run). Here
``finalize`` only flushes, and the run closes the writer once, at its very end (:meth:`close`).
Lightning also logs an ``epoch`` scalar with every metric; TensorBoard would open on its chart,
so it is left out (the epoch is the x-axis of the epoch-level charts anyway). And the HPARAMS tab
shows five hyperparameters by default, those marked as differing across runs first, then by name:
:meth:`log_hyperparams` marks the ones a reader needs (``shown``), so the tab opens on them.

A run resumed or started over in its folder (:class:`Restart`) writes a new event file beside the
earlier sessions'; TensorBoard reads them as one run. What a killed session logged after its
checkpoint the new one logs again, so the new file opens with TensorBoard's mark that hides the
earlier events from the checkpoint's step on (``SummaryWriter``'s ``purge_step``), then the earlier
events at that step logged before the checkpoint was saved (the finished epoch's scalars, its last
sharpness; the time is the run record's, saved in the checkpoint), which the run does not log again:
each point shows once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard.summary import hparams

from optimlab.hydra_job import values_yaml

PLAIN = (str, int, float, bool, type(None))  # hyperparameters values_yaml writes as OmegaConf does


class TensorBoardRunLogger(TensorBoardLogger):
    """:class:`lightning.pytorch.loggers.TensorBoardLogger` writing one event file per run."""

    @functools.cached_property  # (not set in __init__: the config check reads Lightning's signature)
    def last_logged(self) -> dict[str, tuple[int | None, float]]:
        """Each tag's last logged step and value."""
        return {}

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {name: value for name, value in metrics.items() if name != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)
            self.last_logged.update((name, (step, float(value))) for name, value in metrics.items())

    def log_hyperparams(self, params: dict[str, Any], metrics: dict[str, float] | None = None,  # type: ignore[override]
                        step: int | None = None, shown: Iterable[str] = ()) -> None:
        """``params`` against ``metrics`` (tags of the run's own scalars, logged at ``step`` where that
        tag's last point is not already this value at this step: a curve gets no second point) in the
        HPARAMS tab, with the ``shown`` ones (at most five) displayed by default."""
        super().log_hyperparams(params)  # hparams.yaml; without metrics Lightning writes no summary
        if not metrics:
            return

        def logged(tag: str, value: float) -> bool:  # at this step already (as TensorBoard keeps it, in float32)
            if tag not in self.last_logged:
                return False
            last_step, last = self.last_logged[tag]
            last, value = (torch.tensor(v, dtype=torch.float32).item() for v in (last, value))
            return last_step == step and (last == value or (math.isnan(last) and math.isnan(value)))

        new = {tag: value for tag, value in metrics.items() if not logged(tag, float(value))}
        if new:
            self.log_metrics(new, step)
        experiment, start, end = hparams({k: "None" if v is None else v for k, v in params.items()}, metrics)
        data = HParamsPluginData.FromString(experiment.value[0].metadata.plugin_data.content)
        for info in data.experiment.hparam_infos:
            info.differs = info.name in shown
        experiment.value[0].metadata.plugin_data.content = data.SerializeToString()
        for summary in (experiment, start, end):
            self.experiment.file_writer.add_summary(summary, step)

    def finalize(self, status: str) -> None:
        self.experiment.flush()  # the run goes on writing after fit and test

    def close(self, status: str) -> None:
        """The real finalize: close the event file and save ``hparams.yaml``. Hyperparameters that are
        all plain values are written here first, as ``OmegaConf.save`` writes them (Lightning's way, which
        then finds the file and leaves it; 0.3 ms against 1.5 ms a run, 2026-12-06, AMD EPYC), also over
        the ``{}`` Lightning saved at the fit's start, before the run's hyperparameters (its regime) were
        known; never over another run's (a ``save_dir`` folder shared by runs keeps the first)."""
        params = dict(self.hparams)
        if status == "success" and params and all(isinstance(v, PLAIN) for v in params.values()):
            path = Path(self.log_dir) / self.NAME_HPARAMS_FILE
            if path.parent.is_dir() and (not path.exists() or path.read_text(encoding="utf-8").strip() == "{}"):
                path.write_text(values_yaml(params), encoding="utf-8")
        super().finalize(status)


class Restart(NamedTuple):
    """Where a run's events start again in a folder that holds earlier sessions': from ``step`` on the
    earlier events are stale, except those at ``step`` logged before ``checkpoint_time`` (a time as
    :func:`time.time` gives; -inf: none, a run started over)."""

    step: int
    checkpoint_time: float = -math.inf


def in_run_folder(path: str | Path, run_dir: Path) -> bool:
    """Whether ``path`` lies in ``run_dir``: event files there are the run's own, while a folder outside it
    (``logger.tensorboard.save_dir``) may hold other runs' files."""
    return Path(path).resolve().is_relative_to(run_dir.resolve())


def shown_events(log_dir: str | Path, step: int, before: float) -> list[Event]:
    """The summary events at ``step`` logged before ``before`` that TensorBoard shows from the event
    files in ``log_dir``: read in order, each file's mark hiding the earlier files' events at its step and later."""
    shown: list[Event] = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        try:  # as written (EventFileLoader would convert scalars into tensors, which are then not scalars)
            events = [Event.FromString(record) for record in RawEventFileLoader(str(path)).Load()]
        except OSError:  # unreadable: TensorBoard shows nothing of it either
            continue
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                shown = [e for e in shown if e.step < event.step]
            elif event.step == step and event.HasField("summary") and event.wall_time < before:
                shown.append(event)
    return shown


def open_after(loggers: Iterable[Logger], restart: Restart, run_dir: Path) -> None:
    """Open the writers of the TensorBoard loggers that write in ``run_dir`` (made with
    ``purge_step=restart.step``: each new file starts with the mark) and write again the earlier events
    at that step from before the checkpoint. A logger writing elsewhere (a ``save_dir`` shared by runs) is
    left as it is."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger) and in_run_folder(logger.log_dir, run_dir):
            # read before the writer makes its file
            kept = shown_events(logger.log_dir, *restart) if restart.checkpoint_time > -math.inf else []
            writer = logger.experiment.file_writer
            for event in kept:
                writer.add_event(event, walltime=event.wall_time)
            if isinstance(logger, TensorBoardRunLogger):  # a result logged at that step is then not logged twice
                logger.last_logged.update((value.tag, (event.step, value.simple_value)) for event in kept
                                          for value in event.summary.value
                                          if value.WhichOneof("value") == "simple_value")
