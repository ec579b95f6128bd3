"""The LightningModule's divergence guard: a non-finite loss, gradient or weight ends the run."""

from __future__ import annotations

import functools
import time

import lightning as L
import pytest
import torch

from optimlab.data import TensorBatches
from optimlab.models import MLP
from optimlab.module import ClassifierModule
from optimlab.optim import SGD


def quiet_trainer(**kwargs: object) -> L.Trainer:
    """A CPU trainer without logger, checkpoints, progress bar or model summary."""
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def fit(module: ClassifierModule, x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> L.Trainer:
    trainer = quiet_trainer(max_epochs=epochs, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=TensorBatches(x, y, 8), val_dataloaders=TensorBatches(x, y, 8))
    return trainer


def small_module(lr: float = 0.1) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(MLP(hidden=[6], in_features=5), functools.partial(SGD, lr=lr))


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_healthy_run_records_one_row_per_epoch() -> None:
    module = small_module()
    trainer = fit(module, *data())
    assert module.diverged_at_step is None and trainer.global_step == 10
    assert [row["epoch"] for row in module.history] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "train_time_s"} <= set(module.history[0])


def test_nan_loss_stops_before_the_update_is_applied() -> None:
    x, y = data()
    x[24] = float("nan")  # in the 4th batch
    module = small_module()
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer = quiet_trainer(max_epochs=3, callbacks=[Snapshot()])
    trainer.fit(module, train_dataloaders=TensorBatches(x, y, 8))
    assert module.diverged_at_step == 3 and trainer.global_step == 3  # steps 0-2 applied, step 3 refused
    assert "loss or gradient" in module.divergence_reason
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step was never applied
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_gradient_with_finite_loss_is_caught() -> None:
    module = small_module()
    weight = module.model.net[1].weight
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    weight.register_hook(poison)
    trainer = fit(module, *data())
    assert module.diverged_at_step == 1 and trainer.global_step == 1
    assert torch.isfinite(weight).all()


def test_overflowing_weights_end_the_run() -> None:
    module = small_module(lr=1e38)
    fit(module, *data())
    assert module.diverged_at_step is not None
    assert module.divergence_reason in ("non-finite weights after the update", "non-finite loss or gradient")


@pytest.mark.parametrize("every", [1, 4])
def test_check_cadence_still_records_the_divergence(every: int) -> None:
    x, y = data()
    x[24] = float("nan")
    module = small_module()
    module.check_every = every
    fit(module, x, y)
    assert module.diverged_at_step == 3  # cadence 4: steps 0-3 checked together at step 3


def test_train_time_leaves_out_validation() -> None:
    class SlowValidation(ClassifierModule):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            time.sleep(0.1)
            super().validation_step(batch, batch_idx, dataloader_idx)

    torch.manual_seed(0)
    module = SlowValidation(MLP(hidden=[6], in_features=5), functools.partial(SGD, lr=0.1))
    fit(module, *data(), epochs=1)  # 5 tiny training steps, then 5 validation batches of 0.1 s each
    assert module.history[0]["train_time_s"] < 0.25


def test_epoch_training_metrics_cover_every_sample() -> None:
    # lr 0: the weights never move, so the epoch's loss and accuracy are the model's on all 40
    # samples (5 batches of 8), whatever order they came in.
    x, y = data()
    module = small_module(lr=0.0)
    with torch.no_grad():
        logits = module.model(x)
    fit(module, x, y, epochs=1)
    row = module.history[0]
    assert row["train_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert row["train_acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item())


@pytest.mark.parametrize("precision, direct", [("32-true", True), ("64-true", True), ("bf16-mixed", False)])
def test_backward_and_step_go_through_lightning_only_when_the_precision_needs_it(precision: str, direct: bool) -> None:
    module = small_module()
    trainer = quiet_trainer(max_epochs=1, precision=precision)
    backward, step_hook = [], []
    module.manual_backward = lambda loss: (backward.append(1), ClassifierModule.manual_backward(module, loss))
    module.on_before_optimizer_step = lambda optimizer: step_hook.append(1)  # dispatched by Lightning's step
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, train_dataloaders=TensorBatches(*data(), 8))
    assert module._direct is direct
    assert len(backward) == len(step_hook) == (0 if direct else 5)
    # Either way every step is applied and counted.
    assert trainer.global_step == 5 and module.diverged_at_step is None
    assert all(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_loss_scaler_overflow_is_a_skipped_step_not_a_divergence() -> None:
    # 16-mixed: a GradScaler multiplies the loss before backward; with too large a scale the
    # gradients overflow, the scaler skips that step and halves the scale. That is normal AMP
    # behaviour, not a diverging run. Here the first ~30 steps overflow (2**40 down to 2**10).
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    module = small_module()
    trainer = quiet_trainer(max_epochs=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    x, y = data(400)
    trainer.fit(module, train_dataloaders=TensorBatches(x, y, 8))
    assert module.diverged_at_step is None and trainer.global_step == 100
    assert scaler.get_scale() < 2.0**20  # the overflows happened and were absorbed by the scaler
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module.history[1]["train_loss"] < module.history[0]["train_loss"]
