"""The TensorBoard logger of a run (``logger=tensorboard``): Lightning's, with one event file per
run and a landing view that opens on the curves.

Lightning finalizes its loggers at the end of ``fit`` and again of ``test``; its TensorBoard logger
closes the writer there, and the next write opens a new event file (three per run). Here
``finalize`` only flushes, and the run closes the writer once, at its very end (:meth:`close`).
Lightning also logs an ``epoch`` scalar with every metric; TensorBoard would open on its chart,
so it is left out (the epoch is the x-axis of the epoch-level charts anyway).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger


class TensorBoardRunLogger(TensorBoardLogger):
    """:class:`lightning.pytorch.loggers.TensorBoardLogger` writing one event file per run."""

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {name: value for name, value in metrics.items() if name != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        self.experiment.flush()  # the run goes on writing after fit and test

    def close(self, status: str) -> None:
        """The real finalize: close the event file and save ``hparams.yaml``."""
        super().finalize(status)
