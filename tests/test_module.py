"""The LightningModule on a Trainer: non-finite losses, gradients and weights end the run through
the divergence guard; epoch metrics cover every sample; loss-scaler overflows are not divergence."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from optimlab.data import TensorBatches
from optimlab.divergence import DivergenceGuard
from optimlab.models import MLP
from optimlab.module import ClassifierModule, SampleAccuracy, SampleMean
from optimlab.optim import SGD
from optimlab.record import RunRecord
from optimlab.regimes import Thresholds


def small_module(lr: float = 0.1, every: int | None = None) -> ClassifierModule:
    torch.manual_seed(0)
    model = MLP(hidden=[6], in_features=5)
    return ClassifierModule(model, SGD(model.parameters(), lr=lr), guard=DivergenceGuard(every))


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 10, (n,), generator=g)


def fit(module: ClassifierModule, x: torch.Tensor, y: torch.Tensor, tmp_path: Path, epochs: int = 2,
        **trainer_args: object) -> tuple[L.Trainer, RunRecord]:
    record = RunRecord(tmp_path, {"name": "t"}, module.guard, Thresholds())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=epochs, num_sanity_val_steps=0,
                        callbacks=[record, *trainer_args.pop("callbacks", [])], **trainer_args)
    trainer.fit(module, train_dataloaders=TensorBatches(x, y, 8), val_dataloaders=TensorBatches(x, y, 8))
    return trainer, record


def test_the_epoch_line_writes_a_blown_up_loss_in_three_digits() -> None:
    """init_std=1e30's loss of 1.7e31 printed as 32 digits and four decimals (a probe)."""
    row = {"epoch": 1, "train_loss": 1.71e31, "train_acc": 0.132, "val_loss": 0.5, "val_acc": 0.126, "train_time_s": 0.1}
    assert RunRecord.epoch_line(row, 2) == "epoch   1/2 | train loss 1.71e+31 acc 0.1320 | val loss 0.5000 acc 0.1260 | 0.1s"


def test_healthy_run_records_one_row_per_epoch(tmp_path: Path) -> None:
    module = small_module()
    trainer, record = fit(module, *data(), tmp_path)
    assert not module.guard.diverged and trainer.global_step == 10
    assert [row["epoch"] for row in record.history] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "train_time_s"} <= set(record.history[0])
    assert "train_loss_initial" in record.history[0] and "train_loss_initial" not in record.history[1]


def test_nan_loss_stops_before_the_update_is_applied(tmp_path: Path) -> None:
    x, y = data()
    x[24] = float("nan")  # in the 4th batch
    module = small_module()
    before = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    trainer, _ = fit(module, x, y, tmp_path, epochs=3, callbacks=[Snapshot()])
    assert module.guard.step == 3 and trainer.global_step == 3  # steps 0-2 applied, step 3 refused
    assert module.guard.reason == "non-finite loss or gradient"
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step was never applied


def test_non_finite_gradient_with_finite_loss_is_caught(tmp_path: Path) -> None:
    module = small_module()
    weight = module.model.net[1].weight
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 2 else grad

    weight.register_hook(poison)
    trainer, _ = fit(module, *data(), tmp_path)
    assert module.guard.step == 1 and trainer.global_step == 1
    assert torch.isfinite(weight).all()


def test_overflowing_weights_end_the_run(tmp_path: Path) -> None:
    # Finite gradients (~1e29) times lr 1e10 overflow float32 in the very first update.
    module = small_module(lr=1e10)
    module.model.net[1].weight.register_hook(lambda grad: grad * 1e30)
    trainer, _ = fit(module, *data(), tmp_path)
    assert (module.guard.step, module.guard.reason) == (1, "non-finite weights after the update")
    assert trainer.global_step == 1


def test_large_finite_weights_are_not_divergence(tmp_path: Path) -> None:
    # Weights near 1e20 are finite, though their float32 squared norm would overflow.
    module = small_module(lr=0.0)
    with torch.no_grad():
        module.model.net[1].weight.fill_(1e20)
    fit(module, *data(), tmp_path, epochs=1)
    assert not module.guard.diverged


@pytest.mark.parametrize("every, step", [(1, 3), (4, 3), (3, 4)])
def test_check_cadence_still_records_the_divergence(every: int, step: int, tmp_path: Path) -> None:
    x, y = data()
    x[24] = float("nan")  # step 3
    module = small_module(every=every)
    fit(module, x, y, tmp_path)
    assert module.guard.step == step  # checked at the cadence (or the epoch's last batch)


def test_epoch_training_metrics_cover_every_sample(tmp_path: Path) -> None:
    # lr 0: the weights never move, so the epoch's loss and accuracy are the model's on all 40
    # samples (5 batches of 8), whatever order they came in.
    x, y = data()
    module = small_module(lr=0.0)
    with torch.no_grad():
        logits = module.model(x)
    _, record = fit(module, x, y, tmp_path, epochs=1)
    row = record.history[0]
    assert row["train_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert row["train_acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert row["val_loss"] == pytest.approx(row["train_loss"], rel=1e-6)  # same data, same weights


def test_loss_scaler_overflow_is_a_skipped_step_not_a_divergence(tmp_path: Path) -> None:
    # 16-mixed: a GradScaler multiplies the loss before backward; with too large a scale the
    # gradients overflow, the scaler skips that step and halves the scale. That is normal AMP
    # behaviour, not a diverging run. Here the first ~30 steps overflow (2**40 down to 2**10).
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    module = small_module()
    x, y = data(400)
    trainer, record = fit(module, x, y, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert not module.guard.diverged and trainer.global_step == 100
    assert scaler.get_scale() < 2.0**20  # the overflows happened and were absorbed by the scaler
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert record.history[1]["train_loss"] < record.history[0]["train_loss"]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_acts_on_unscaled_gradients_under_a_loss_scaler(algorithm: str, tmp_path: Path) -> None:
    """16-mixed multiplies the loss by the scaler's 2**16; clipping before the scaler unscaled the gradients
    cut them to clip / 2**16 (a review: the weights barely moved). The clipped run moves as its float32 twin."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    x, y = data(8)
    moved = []
    for plugins in ([], [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))]):
        module = small_module(lr=1.0)
        module.clip_val, module.clip_algorithm = 0.05, algorithm
        start = torch.cat([p.detach().flatten().clone() for p in module.parameters()])
        (tmp_path / str(len(moved))).mkdir()
        fit(module, x, y, tmp_path / str(len(moved)), epochs=1, plugins=plugins)
        moved.append(torch.cat([p.detach().flatten() for p in module.parameters()]) - start)
    assert moved[0].norm() > 0.01  # the clip bounds a step, it does not stop it
    assert torch.allclose(moved[1], moved[0], rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("hooked", [False, True])
def test_backward_hooks_run_when_a_callback_has_them(hooked: bool, tmp_path: Path) -> None:
    # Without backward hooks the module calls backward itself (cheaper); a callback that has one
    # turns Lightning's manual_backward back on, and the training is the same either way.
    calls = []

    class GradientWatcher(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            calls.append(sum(float(p.grad.abs().sum()) for p in pl_module.parameters()))

    module = small_module()
    fit(module, *data(), tmp_path, callbacks=[GradientWatcher()] if hooked else [])
    assert module.hooked_backward is hooked
    assert len(calls) == (10 if hooked else 0) and all(c > 0 for c in calls)
    weights = [p.detach().clone() for p in module.parameters()]
    other = small_module()
    (tmp_path / "other").mkdir()
    fit(other, *data(), tmp_path / "other", callbacks=[] if hooked else [GradientWatcher()])
    assert all(torch.equal(a, b) for a, b in zip(weights, other.parameters()))


def test_console_lines_go_around_the_progress_bar() -> None:
    import io
    import logging

    from tqdm import tqdm

    from optimlab.console import BarSafeHandler

    screen = io.StringIO()
    handler = BarSafeHandler()
    handler.setStream(screen)
    record = logging.LogRecord("optimlab", logging.INFO, __file__, 1, "epoch   1/2 | train loss 0.5", None, None)
    with tqdm(total=10, file=screen, ncols=60) as bar:
        bar.update(3)
        handler.emit(record)
    # the bar's line is cleared before the epoch line is written, so the line starts a line of its own
    assert "\nepoch   1/2 | train loss 0.5\n" in screen.getvalue().replace("\r", "\n")


def test_a_stop_signal_during_a_console_line_is_raised_at_the_next_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop signal whose handler runs while the console handler writes a line (inside tqdm.write, whose
    lock a KeyboardInterrupt there left half-released) only remembers the stop: the line is written whole,
    without a logging error, and the stop is raised at the next batch."""
    import io
    import logging
    import signal

    from tqdm import tqdm

    from optimlab.console import BarSafeHandler
    from optimlab.signals import StopOnSignal

    screen, stopper = io.StringIO(), StopOnSignal()

    def write_interrupted(text: str, file: io.StringIO) -> None:
        stopper.handle(signal.SIGINT, None)  # the signal's handler, run mid-write
        file.write(text + "\n")

    monkeypatch.setattr(tqdm, "write", write_interrupted)
    handler = BarSafeHandler()
    handler.setStream(screen)
    try:
        handler.emit(logging.LogRecord("optimlab", logging.INFO, __file__, 1, "epoch   3/9 | train loss 0.5", None, None))
    except KeyboardInterrupt:
        pytest.fail("the stop was raised inside the console line")
    assert screen.getvalue() == "epoch   3/9 | train loss 0.5\n" and stopper.requested == "SIGINT"
    assert not BarSafeHandler.writing
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        stopper.on_train_batch_start()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):  # outside a line: at once
        stopper.handle(signal.SIGTERM, None)


def test_evaluation_loss_is_the_mean_over_samples_not_over_batches() -> None:
    """Batch means weighted by their sizes: two full batches of loss 1 and a short one of loss 10
    average to 1.6 over the 150 samples (4.0 over the three batches); a non-finite loss goes through."""
    mean = SampleMean()
    for loss, size in ((1.0, 70), (1.0, 70), (10.0, 10)):
        mean.update(torch.tensor(loss), size)
    assert mean.compute().item() == pytest.approx(1.6)
    mean.update(torch.tensor(float("nan")), 5)
    assert mean.compute().isnan()


def test_evaluation_accuracy_is_the_exact_fraction_of_samples() -> None:
    """19 of 200 right is 0.095 (float64), as a population member records it; torchmetrics' float32
    accuracy gave 0.0949999988079071. NaN logits count as class 0, as argmax takes them."""
    accuracy = SampleAccuracy()
    target = torch.arange(200) % 10
    logits = torch.zeros(200, 10)
    logits[:19, :] = F.one_hot(target[:19], 10).float()
    logits[19:, :] = F.one_hot((target[19:] + 1) % 10, 10).float()
    accuracy.update(logits[:150], target[:150])
    accuracy.update(logits[150:], target[150:])
    assert accuracy.compute().item() == 0.095 and accuracy.compute().dtype == torch.float64
    accuracy.update(torch.full((10, 10), float("nan")), torch.tensor([0] * 3 + [1] * 7))
    assert accuracy.compute().item() == 22 / 210
