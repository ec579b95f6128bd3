"""The LightningModule: a classifier trained by one optimizer on cross-entropy.

Optimization is manual (forward, backward, check, step) so that a non-finite loss or gradient is
caught by the :class:`~optimlab.divergence.DivergenceGuard` *before* the optimizer writes it into
the weights. What a run records (history, timing, RNG state, summary.json) is the
:class:`~optimlab.record.RunRecord` callback's job; this class only trains and evaluates.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from optimlab.divergence import WEIGHTS, DivergenceGuard, all_finite, total_sum

EVAL_STAGES = ("val", "test")  # validation dataloader 0 is "val"; 1, when present, is "test"
BACKWARD_HOOKS = ("on_before_backward", "on_after_backward")


class SampleMean(Metric):
    """The mean over every sample of values given as batch means with their batch sizes. NaN and
    infinities go through: a diverged model's loss is recorded as it is. (torchmetrics' MeanMetric
    drops the weights under ``nan_strategy="disable"``, torchmetrics 1.9: a short last batch then
    counted as much as a full one.)"""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, batch_mean: Tensor, batch_size: int) -> None:
        self.total += batch_mean * batch_size
        self.count += batch_size

    def compute(self) -> Tensor:
        return self.total / self.count


class SampleAccuracy(Metric):
    """The fraction of samples whose logits' argmax is their label, counted exactly and divided in
    float64 (float32 where the device has none, MPS): 0.095, where torchmetrics' accuracy gives float32's
    0.0949999988, and where a population member's records (and the fit bar it is compared with) hold 0.095."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hits", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.hits += (logits.argmax(1) == target).sum()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return self.hits.to(torch.float32 if self.hits.device.type == "mps" else torch.float64) / self.count


class ClassifierModule(L.LightningModule):
    """Trains ``model`` with ``optimizer`` (built on ``model``'s parameters), stepping ``scheduler``
    once per epoch.

    Args:
        model: the classifier (logits out).
        optimizer: an optimizer over ``model.parameters()``.
        scheduler: optional learning-rate scheduler of ``optimizer``, stepped after each epoch.
        guard: the divergence guard (its cadence: see :class:`~optimlab.divergence.DivergenceGuard`).
        check_weights_every_n_steps: cadence of the check that the updated weights are finite (a
            host sync); a finite gradient can still overflow the weights.
        gradient_clip_val, gradient_clip_algorithm: clip each step's gradients (Lightning's
            ``clip_gradients``: by total norm, or ``"value"``), after the non-finite check.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 guard: DivergenceGuard | None = None, check_weights_every_n_steps: int = 50,
                 gradient_clip_val: float | None = None,
                 gradient_clip_algorithm: str | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.guard = guard or DivergenceGuard()
        self.check_weights_every = check_weights_every_n_steps
        self.clip_val, self.clip_algorithm = gradient_clip_val, gradient_clip_algorithm
        # "_" suffix: ModuleDict keys may not shadow nn.Module attributes.
        self.eval_loss = nn.ModuleDict({f"{s}_": SampleMean() for s in EVAL_STAGES})
        self.eval_acc = nn.ModuleDict({f"{s}_": SampleAccuracy() for s in EVAL_STAGES})

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def configure_optimizers(self) -> Any:
        if self.scheduler is None:
            return self.optimizer
        return {"optimizer": self.optimizer, "lr_scheduler": self.scheduler}

    def on_validation_start(self) -> None:
        # torchmetrics evaluates in float32 whatever the module's dtype (and the trainer's precision
        # setup resets what is set before it); a float64 run evaluates in float64 too, so that its
        # records match a population's to 1e-9, not to float32 rounding.
        if self.trainer.precision == "64-true":
            for metric in self.eval_loss.values():
                metric.set_dtype(torch.float64)

    on_test_start = on_validation_start

    def on_fit_start(self) -> None:
        self.guard.resolve(self.device)
        # With a loss scaler (16-mixed) overflowing gradients are routine: the scaler skips that
        # step and lowers its scale. Then only the (unscaled) loss tells a diverging run.
        self.scaled_grads = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        # manual_backward adds the loss scaling and the backward hooks of the module and callbacks.
        # Without either, backward is called directly: the two hook sweeps cost about 0.1-0.2 ms a
        # step, a few per cent of a CPU step (benchmarks/README.md).
        self.hooked_backward = self.scaled_grads or any(
            getattr(type(obj), hook) is not getattr(base, hook)
            for obj, base in [(self, L.LightningModule), *((c, L.Callback) for c in self.trainer.callbacks)]
            for hook in BACKWARD_HOOKS)
        self.trained_params = list(self.model.parameters())  # a step does not walk the module tree

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # the data module keeps every split on the training device already (data.py)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        x, y = batch
        optimizer = self.optimizers()
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if self.hooked_backward:
            self.manual_backward(loss)
        else:
            loss.backward()
        loss, step = loss.detach(), self.global_step
        last = batch_idx + 1 == self.trainer.num_training_batches
        grads = [p.grad for p in self.trained_params if p.grad is not None]
        # One value for the whole check: the sum is non-finite when the loss or any gradient is.
        check = loss if self.scaled_grads else loss + total_sum(grads)
        if self.guard.check(check, step, now=last):
            self.trainer.should_stop = True
            return None  # the bad update is never applied
        try:
            optimizer.step()
        except RuntimeError as err:
            if "without overflow" not in str(err):
                raise
            # torch.optim's own optimizers (optimizer.impl=torch) with a coefficient beyond the weights' dtype
            # (float32 Adam at lr 3.4e37: lr / (1 - beta1)): torch refuses to convert it, where the update has no
            # finite value. The weights are left non-finite, as ours leave them (optim.base.beyond_dtype); the
            # step, refused, is not counted (ours count it, as a population's member does).
            with torch.no_grad():
                for p in self.trained_params:
                    p.fill_(float("nan"))
        if (step % self.check_weights_every == 0 or last) and not all_finite(self.trained_params):
            self.guard.record(step + 1, WEIGHTS)
            self.trainer.should_stop = True
        return {"loss": loss, "logits": logits.detach(), "target": y}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Here, inside optimizer.step(): under 16-mixed the loss scaler has unscaled the gradients by now,
        # so the clip acts on the true gradients (in training_step it clipped the scaled ones).
        if self.clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=self.clip_val, gradient_clip_algorithm=self.clip_algorithm)

    def on_train_epoch_end(self) -> None:
        if self.scheduler is not None and not self.guard.diverged:
            self.lr_schedulers().step()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(EVAL_STAGES[dataloader_idx], batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        """Accumulate ``stage``'s loss and accuracy over the epoch; Lightning computes them at its end, for
        the callbacks (checkpoint and early-stopping monitors) and the run record, which logs each epoch's
        row at the epoch's last step as a population's member does (Lightning's own logging would put
        validation one step before training)."""
        x, y = batch
        logits = self(x)
        loss, acc = self.eval_loss[stage + "_"], self.eval_acc[stage + "_"]
        loss.update(F.cross_entropy(logits, y), len(y))
        acc.update(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, add_dataloader_idx=False, logger=False)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, add_dataloader_idx=False, logger=False)
