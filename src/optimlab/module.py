"""The LightningModule: one classifier, one optimizer, cross-entropy, metrics and divergence checks.

Optimization is manual (one forward, backward and ``step`` per batch) so that a non-finite loss or
gradient is caught *before* the optimizer writes it into the weights: the step is skipped, the
run is marked diverged and the trainer stops at the end of that step.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import DoublePrecision, Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

EVAL_STAGES = ("val", "test")


def total_norm(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of all tensors together, computed on their device without a host sync."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def total_sum(tensors: list[Tensor]) -> Tensor:
    """The sum of all elements: non-finite if any element is (or if it overflows, which only
    divergent gradients do). A cheaper per-step check than the norm, which squares every element."""
    return torch.stack([t.sum() for t in tensors]).sum()


class ClassifierModule(L.LightningModule):
    """Trains ``model`` with the optimizer built by ``optimizer(params)``.

    Args:
        model: the classifier (logits out).
        optimizer: a partial taking the parameters (Hydra ``_partial_``), e.g. ``optimlab.optim.SGD``.
        scheduler: optional partial taking the optimizer; stepped once per epoch.
        log_every_n_steps: cadence of per-step scalars (loss, lr, gradient and weight norms) and of
            the check that the weights are finite.
        check_finite_every_n_steps: cadence of the host sync that looks for a non-finite loss or
            gradient. At 1 such a step is never applied; larger values save syncs on a GPU but may
            apply up to n-1 bad steps before stopping (``diverged_at_step`` is then the step of the
            check). None: 1 on the CPU, where the check costs nothing, 10 on an accelerator.
        compile: ``torch.compile`` the model (its cost shows in ``first_step_s``).
    """

    def __init__(self, model: nn.Module, optimizer: Callable[[Iterable[Tensor]], torch.optim.Optimizer],
                 scheduler: Callable[[torch.optim.Optimizer], Any] | None = None, log_every_n_steps: int = 50,
                 check_finite_every_n_steps: int | None = None, compile: bool = False, num_classes: int = 10) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = torch.compile(model) if compile else model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.log_every_n_steps, self.check_every = log_every_n_steps, check_finite_every_n_steps
        self.loss_metrics = nn.ModuleDict({f"{s}_": MeanMetric(nan_strategy="disable") for s in EVAL_STAGES})
        self.acc_metrics = nn.ModuleDict({
            f"{s}_": MulticlassAccuracy(num_classes, average="micro", validate_args=False) for s in EVAL_STAGES})
        # ModuleDict keys get a "_" suffix: "train" is an nn.Module attribute name. Training loss
        # and accuracy are collected per step instead (see training_step): cheaper.
        # What a run records: per-epoch rows, and where and why it diverged. Saved in checkpoints.
        self.history: list[dict[str, float]] = []
        self.diverged_at_step: int | None = None
        self.divergence_reason: str | None = None
        self.first_step_s: float | None = None
        self._pending_checks: list[Tensor] = []  # per-step check values not yet read
        self._initial_loss: Tensor | None = None
        # This epoch's per-step training losses, logits and targets, kept on the device as they
        # are (no work or host sync per step) and reduced once at the end of the epoch.
        self._step_losses: list[Tensor] = []
        self._step_logits: list[Tensor] = []
        self._step_targets: list[Tensor] = []
        self._eval_row: dict[str, float] = {}
        self._epoch_start = 0.0
        self._train_time = 0.0

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning rewrites plain attributes (``_current_fx_name`` and others) several times per
        # step; nn.Module.__setattr__ checks each against parameters, buffers and submodules first.
        # A name already in __dict__ is none of those, so for a non-tensor value the result is the same.
        if name in self.__dict__ and not isinstance(value, (Tensor, nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # ---- training ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.check_every is None:
            self.check_every = 1 if self.device.type == "cpu" else 10
        self._params = [p for p in self.parameters() if p.requires_grad]  # not re-walked every step
        # Lightning's manual_backward and optimizer step are needed when the precision plugin scales
        # the loss (16-mixed) or the strategy syncs gradients. Otherwise they only dispatch hooks that
        # nothing here uses (on_before/after_backward, on_before_optimizer_step), at about 0.18 and
        # 0.08 ms a step on a 2-core CPU (4% and 2% of an MLP step).
        # The direct step calls the two step counters Lightning's optimizer wrapper keeps (private
        # names in Lightning 2.x); if a version lacks them, Lightning's own path is taken.
        opt = self.optimizers()
        self._direct = (type(self.trainer.strategy) is SingleDeviceStrategy
                        and type(self.trainer.precision_plugin) in (Precision, DoublePrecision)
                        and all(callable(getattr(opt, name, None)) for name in ("_on_before_step", "_on_after_step")))
        # With a loss scaler (16-mixed) overflowing gradients are routine: the scaler skips that
        # step and lowers its scale. Then only the (unscaled) loss tells a diverging run.
        self._scaled_grads = getattr(self.trainer.precision_plugin, "scaler", None) is not None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # The data module keeps every split on the training device already (see data.py); skip
        # Lightning's per-batch walk over the batch structure.
        return batch

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        started = time.perf_counter() if self.first_step_s is None else 0.0
        x, y = batch
        opt = self.optimizers()
        logits = self.model(x)  # not self(x): one module call less per step
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        if self._direct:
            loss.backward()
        else:
            self.manual_backward(loss)
        params = [p for p in self._params if p.grad is not None]
        grads = [p.grad for p in params]
        step = self.global_step  # optimizer steps applied so far
        loss = loss.detach()
        # One value to check: the sum is non-finite when the loss or any gradient element is.
        check = loss if self._scaled_grads else loss + total_sum(grads)
        if self._found_nonfinite(check, step, "non-finite loss or gradient"):
            return  # the bad update is never applied
        if self._direct:
            # The two calls around the update are Lightning's step counters (global_step).
            opt._on_before_step()
            opt.optimizer.step()
            opt._on_after_step()
        else:
            opt.step()
        if step == 0:
            self._initial_loss = loss  # the yardstick for loss spikes (regimes.py)
        self._step_losses.append(loss)
        self._step_logits.append(logits.detach())
        self._step_targets.append(y)
        if step % self.log_every_n_steps == 0 and self._log_step(step, loss, params, grads, opt.param_groups[0]["lr"]):
            return
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - started

    def _found_nonfinite(self, value: Tensor, step: int, reason: str) -> bool:
        """Keep ``value`` on the device; on the cadence, add up the pending values (NaN and inf
        propagate), read the total and, if it is not finite, record the divergence and stop."""
        pending = self._pending_checks
        pending.append(value)
        if (step + 1) % self.check_every and not self._is_last_batch():
            return False
        total = pending[0] if len(pending) == 1 else torch.stack(pending).sum()
        pending.clear()
        hit = not math.isfinite(total.item())
        if hit:
            self._diverge(step, reason)
        return hit

    def _log_step(self, step: int, loss: Tensor, params: list[Tensor], grads: list[Tensor], lr: float) -> bool:
        """Per-step scalars, written straight to the logger on the logging cadence (``self.log``
        would add bookkeeping to every step). With finite gradients only an overflowing update
        makes weights non-finite; that shows in the next step's loss, and this check catches the
        rest. True if the weights are not finite (the run then stops)."""
        loss_value, grad_norm, weight_norm = torch.stack([loss, total_norm(grads), total_norm(params)]).tolist()
        if not math.isfinite(weight_norm):
            self._diverge(step + 1, "non-finite weights after the update")
            return True
        if self.logger is not None:
            self.logger.log_metrics({"train/loss_step": loss_value, "train/grad_norm": grad_norm,
                                     "train/weight_norm": weight_norm, "train/lr": lr}, step=step)
        return False

    def _diverge(self, step: int, reason: str) -> None:
        self.diverged_at_step, self.divergence_reason = step, reason
        self.trainer.should_stop = True

    def _is_last_batch(self) -> bool:
        loop = self.trainer.fit_loop.epoch_loop
        return loop.batch_progress.current.ready >= self.trainer.num_training_batches

    def on_train_epoch_end(self) -> None:
        if self.trainer.is_global_zero and self.device.type == "cuda":
            torch.cuda.synchronize()
        train = self._train_epoch_metrics()
        if self._initial_loss is not None:
            train["train_loss_initial"] = self._initial_loss.item()
            self._initial_loss = None
        row = {"epoch": self.current_epoch + 1, **train, **self._eval_row}
        row["train_time_s"] = self._train_time or time.perf_counter() - self._epoch_start
        self._eval_row, self._train_time = {}, 0.0
        self.history.append(row)
        self.log_dict({"train/loss": row["train_loss"], "train/acc": row["train_acc"]})
        if self.scheduler_factory is not None and self.diverged_at_step is None:
            self.lr_schedulers().step()

    def _train_epoch_metrics(self) -> dict[str, float]:
        """This epoch's training loss and accuracy (over all its samples) and largest step loss."""
        if not self._step_losses:
            return {"train_loss": math.nan, "train_acc": math.nan}
        losses = torch.stack(self._step_losses).double()
        targets = torch.cat(self._step_targets)
        sizes = torch.tensor([len(t) for t in self._step_targets], dtype=torch.float64, device=losses.device)
        correct = (torch.cat(self._step_logits).argmax(1) == targets).sum().double()
        loss_sum, correct, loss_max = torch.stack([losses @ sizes, correct, losses.max()]).tolist()
        self._step_losses, self._step_logits, self._step_targets = [], [], []
        return {"train_loss": loss_sum / len(targets), "train_acc": correct / len(targets), "train_loss_max": loss_max}

    # ---- evaluation -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: the epoch's training ends here
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self._train_time = time.perf_counter() - self._epoch_start

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(("val", "test")[dataloader_idx], batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        logits = self(x)
        self.loss_metrics[stage + "_"].update(F.cross_entropy(logits, y), len(y))
        self.acc_metrics[stage + "_"].update(logits, y)

    def on_validation_epoch_end(self) -> None:
        for stage in ("val", "test"):
            if self.loss_metrics[stage + "_"].update_called:
                values = self._compute(stage)
                self._eval_row.update(values)
                self.log_dict({f"{stage}/loss": values[f"{stage}_loss"], f"{stage}/acc": values[f"{stage}_acc"]},
                              add_dataloader_idx=False)

    def on_test_epoch_end(self) -> None:
        values = self._compute("test")
        self.log_dict({"test/loss": values["test_loss"], "test/acc": values["test_acc"]})

    def _compute(self, stage: str) -> dict[str, float]:
        """Epoch loss and accuracy of ``stage`` as Python floats (NaN when nothing was seen)."""
        loss_metric, acc_metric = self.loss_metrics[stage + "_"], self.acc_metrics[stage + "_"]
        seen = loss_metric.update_called
        values = {f"{stage}_loss": float(loss_metric.compute()) if seen else math.nan,
                  f"{stage}_acc": float(acc_metric.compute()) if seen else math.nan}
        loss_metric.reset()
        acc_metric.reset()
        return values

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything a resumed run needs to continue *exactly*: its record and every RNG state.
        checkpoint["optimlab"] = {
            "history": self.history, "diverged_at_step": self.diverged_at_step,
            "divergence_reason": self.divergence_reason, "first_step_s": self.first_step_s,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only a resumed fit continues the saved record. Testing a checkpoint (test_ckpt=best) loads
        # its weights but keeps this run's record: the epochs after the best one happened too.
        if self._trainer is not None and self._trainer.state.fn != TrainerFn.FITTING:
            return
        saved = checkpoint.get("optimlab", {})
        self.history = list(saved.get("history", []))
        self.diverged_at_step = saved.get("diverged_at_step")
        self.divergence_reason = saved.get("divergence_reason")
        self.first_step_s = saved.get("first_step_s")
        if "rng_cpu" in saved:
            self._restored_rng = (saved["rng_cpu"], saved["rng_cuda"])

    def on_train_start(self) -> None:
        # Restore RNG states last, after Lightning's own start-up work may have drawn numbers.
        restored = getattr(self, "_restored_rng", None)
        if restored is not None:
            torch.set_rng_state(restored[0])
            if restored[1] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(restored[1])
            self._restored_rng = None


# Lightning reads training_step's signature on every step (inspect.getfullargspec, to decide whether
# to pass batch_idx); a stored __signature__ makes that a lookup instead of a re-derivation.
ClassifierModule.training_step.__signature__ = inspect.signature(ClassifierModule.training_step)
