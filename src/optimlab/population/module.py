"""A population's training as one Lightning fit: Lightning's loop runs the epochs and batches (manual
optimization), each batch a few of the population loop's steps and each epoch's end the loop's.

:class:`~optimlab.population.loop.PopulationLoop` holds the math and the members' records; this
module only hands its steps to a ``lightning.Trainer``, as a single run's
:class:`~optimlab.module.ClassifierModule` does, so that Lightning's loop and callbacks (the stop on
SIGINT/SIGTERM) drive a population as they drive a run. The batches stay on the device the
data put them on; validation is the loop's own (every member at once), run at the epoch's end.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor

if TYPE_CHECKING:
    from optimlab.population.loop import PopulationLoop


# Lightning's loop costs 0.15-0.5 ms around each batch (measured on the 2-core CPU), up to a third of a
# small population's step; handing it STEPS_PER_BATCH steps at a time makes that a fiftieth or less.
STEPS_PER_BATCH = 16


class EpochBatches:
    """The loop's training batches of its next epoch (``epochs_done``) as a data loader, iterated once per
    epoch: each item the next :data:`STEPS_PER_BATCH` of them (fewer at the epoch's end), drawn as they
    are stepped (an iterator over the epoch's batches, not a list of them: one batch in memory at a time)."""

    def __init__(self, loop: PopulationLoop) -> None:
        self.loop = loop

    def __len__(self) -> int:
        return math.ceil(self.loop.data.steps_per_epoch / STEPS_PER_BATCH)

    def __iter__(self) -> Iterator[Iterator[tuple[Tensor, Tensor]]]:
        batches = self.loop.data.train_batches(self.loop.epochs_done)
        return (itertools.islice(batches, STEPS_PER_BATCH) for _ in range(len(self)))


class PopulationModule(L.LightningModule):
    """``loop``'s epochs as a LightningModule: each training step is :data:`STEPS_PER_BATCH` of
    :meth:`PopulationLoop.train_step`, each epoch opens with :meth:`PopulationLoop.start_epoch` and closes with
    :meth:`PopulationLoop.finish_epoch` (which evaluates and records every member); the fit stops when
    no member is left training.

    Lightning is handed neither the stacked model (the loop is a plain attribute, not a submodule) nor
    its optimizer: at the end of a fit Lightning moves the module's parameters and its optimizers'
    state to the CPU, and the loop's stay on its device (where the test evaluation and a resumed fit
    use them), already placed and cast by the caller."""

    def __init__(self, loop: PopulationLoop, test_every_epoch: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.loop, self.test_every_epoch = loop, test_every_epoch

    def configure_optimizers(self) -> None:
        return None  # the loop steps its own optimizer (see the class docstring)

    def train_dataloader(self) -> EpochBatches:
        return EpochBatches(self.loop)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # gathered on the device already (PopulationData)

    def on_train_epoch_start(self) -> None:
        self.loop.start_epoch()

    def training_step(self, batch: Iterator[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        steps = self.loop.data.steps_per_epoch
        for i, (x, y) in enumerate(batch, start=batch_idx * STEPS_PER_BATCH):
            self.loop.train_step(x, y, last=i + 1 == steps)

    def on_train_epoch_end(self) -> None:
        if not self.loop.finish_epoch(self.test_every_epoch):
            self.trainer.should_stop = True


def fit(loop: PopulationLoop, epochs: int, test_every_epoch: bool = False,
        callbacks: Sequence[L.Callback] = ()) -> None:
    """Train ``loop`` up to ``epochs`` epochs in total (a restored loop goes on from ``epochs_done``)
    in a ``lightning.Trainer`` on the loop's device, with ``callbacks``; no logger, checkpoints or
    progress bar (the population's records and checkpoint are the loop's and its caller's)."""
    remaining = epochs - loop.epochs_done
    if remaining <= 0 or not bool(loop.alive.any()):  # (restored after every member diverged or stopped)
        return
    device = loop.params[0].device  # a tensor's: on CUDA always with its index
    trainer = L.Trainer(accelerator=device.type, devices=[device.index] if device.type == "cuda" else 1,
                        max_epochs=remaining, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*configure_optimizers.*returned `None`")
        trainer.fit(PopulationModule(loop, test_every_epoch))
