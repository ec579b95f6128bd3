"""The run record: one callback that owns everything a run writes about itself.

:class:`RunRecord` keeps the per-epoch history, times the epochs, prints the epoch line, logs the
epoch and per-step scalars, saves the RNG states and the divergence record in each checkpoint (its
own ``state_dict``), and writes ``summary.json`` (schema: :class:`~optimlab.summary.RunSummary`)
after every epoch and at the end.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from optimlab.checkpointing import holds_a_run, last_checkpoint
from optimlab.curvature import SHARPNESS_TAG, THRESHOLD_TAG, SharpnessCallback, epoch_columns
from optimlab.divergence import DivergenceGuard, total_norm
from optimlab.hydra_job import save_job_record
from optimlab.lr_schedule import epoch_start_lrs, lr_monitor_followed, lr_monitor_tag
from optimlab.module import EVAL_STAGES
from optimlab.regimes import Thresholds, decimals
from optimlab.summary import SUMMARY, RunSummary, describe_run, diagnose_run, read_summary, write_summary
from optimlab.tensorboard_logger import Restart, TensorBoardRunLogger


log = logging.getLogger(__name__)
# RunSummary.train_steps columns -> their TensorBoard tags
STEP_SCALARS = {"loss": "train/loss_step", "grad_norm": "train/grad_norm", "weight_norm": "train/weight_norm",
                "lr": "train/lr"}


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__}


def refused_summary(cfg: DictConfig, error: str) -> RunSummary:
    """The ``crashed`` summary of a run that recorded nothing itself (refused before any work, or its
    population failed first), with its config and ``error``."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # the error may be an interpolation that cannot resolve
        config = OmegaConf.to_container(cfg, resolve=False)
    return RunSummary(status="crashed", config=config, description=vars(describe_run(config)), versions=versions(),
                      error=error)


def holds_nothing_trained(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a record of nothing trained: no summary, or a ``crashed`` one without
    epochs (a refused job's), and no checkpoint."""
    if last_checkpoint(run_dir) is not None:
        return False
    if not (run_dir / SUMMARY).exists():
        return True
    saved = read_summary(run_dir)  # an unreadable one may be a run's: kept
    return saved is not None and saved.status == "crashed" and not saved.epochs


def record_refusal(run_dir: Path, cfg: DictConfig, error: str) -> None:
    """A sweep job refused before any work: its folder gets Hydra's record of the job and a ``crashed``
    summary with the one-line ``error`` (what the report lists), unless it holds a run already; under
    ``resume=auto``, which may take a folder that holds nothing trained, that record is replaced (an earlier
    refusal's: the report lists the latest error)."""
    if holds_a_run(run_dir) and not (cfg.get("resume") == "auto" and holds_nothing_trained(run_dir)):
        return
    save_job_record(run_dir, cfg)
    write_summary(run_dir, refused_summary(cfg, error))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # platform.machine(), not processor(): that runs `uname -p` in a subprocess (on Linux "unknown" or the machine)
    threads = torch.get_num_threads()
    return f"{device.type} ({platform.machine()}, {threads} thread{'s' if threads > 1 else ''})"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read next times finished work (CPU: nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diagnosed_summary(status: str, config: dict[str, Any], history: list[dict[str, Any]],
                      train_steps: list[dict[str, float]], thresholds: Thresholds, **fields: Any) -> RunSummary:
    """A run's summary from its record (``fields``: the :class:`~optimlab.summary.RunSummary` fields it
    gives, among them ``steps``, ``diverged``, ``diverged_at_step``, ``curvature``, ``first_step_s``,
    ``train_size``) with what follows from it: the diagnosis of its history, its best validation accuracy,
    its training time and throughput (without the first step: warm-up, and compilation with
    ``trainer.compile=true``)."""
    diagnosis = diagnose_run(config, history, fields.get("diverged", False), fields.get("diverged_at_step"),
                             fields.get("curvature"), fields.get("train_size"), thresholds)
    train_time = sum(row.get("train_time_s", 0.0) for row in history)
    steady_steps, steady_time = fields.get("steps", 0) - 1, train_time - (fields.get("first_step_s") or 0.0)
    val_accs = [r["val_acc"] for r in history if math.isfinite(r.get("val_acc", math.nan))]
    return RunSummary(
        status=status, config=config, description=vars(describe_run(config)).copy(), epochs=history,
        train_steps=train_steps, best_val_acc=max(val_accs, default=None), regime=diagnosis.regime,
        regime_evidence=diagnosis.evidence, regime_measures=diagnosis.measures, train_time_s=train_time,
        steps_per_s=steady_steps / steady_time if steady_steps > 0 and steady_time > 0 else None,
        versions=versions(), **fields)


class RunRecord(Checkpoint):
    """Records one run into ``run_dir``.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` subclass only for its place in the hook
    order: Lightning runs checkpoint callbacks after the LightningModule's epoch-end hook, in list
    order, so placed before the ModelCheckpoints this callback's new epoch row is in the checkpoint
    they save.

    Args:
        run_dir: where ``summary.json`` goes.
        config: the resolved run config (a plain dict).
        guard: the training module's divergence guard (its record is saved with the checkpoints).
        thresholds: the diagnosis thresholds.
        log_every_n_steps: cadence of the per-step scalars.
        wall_time_before: wall time spent in earlier sessions of a resumed run.
        sharpness: the sharpness tracker, when ``curvature.every_n_steps`` is set: its epoch
            records go into the epoch rows, its run record into the summary and the diagnosis.
        steps_per_epoch: the updates of a full epoch (for a resumed run's CSV rows, :meth:`rewrite_csv`).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], guard: DivergenceGuard, thresholds: Thresholds,
                 log_every_n_steps: int = 50, wall_time_before: float = 0.0,
                 sharpness: SharpnessCallback | None = None, steps_per_epoch: int = 0) -> None:
        self.run_dir, self.config, self.guard, self.thresholds = run_dir, config, guard, thresholds
        self.steps_per_epoch = steps_per_epoch
        self.sharpness = sharpness
        self.log_every = log_every_n_steps
        self.started, self.wall_time_before = time.perf_counter(), wall_time_before
        self.history: list[dict[str, float]] = []
        self.train_steps: list[dict[str, float]] = []  # RunSummary.train_steps
        # The lr each epoch started with (what a callbacks.lr_monitor logs), for a resumed run's CSV: the
        # config of a run resumed with more epochs may schedule other lrs (a cosine's T_max: ${epochs}).
        self.epoch_lrs: list[float] = []
        self.first_step_s: float | None = None
        self.extra: dict[str, Any] = {}  # set by the caller: params, train_size, label_noise_images, device
        self._pending_record: dict[str, Any] | None = None  # a resumed run's saved state, until applied
        self._pending_rng: dict[str, Any] | None = None
        self._csv_to_rewrite = False  # a resumed run's CSV rows from before the resume, until written back
        self._steps: list[dict[str, Tensor]] = []  # this epoch's step outputs, reduced at its end
        self._epoch_start = self._step_start = 0.0
        self._train_time: float | None = None
        self._initial_loss: float | None = None
        self._global_step = 0
        self._unwritten = False  # the last epoch's line and summary are still to be written

    # ---- checkpoint state: the record so far and every RNG state ---------------------------------
    def state_dict(self) -> dict[str, Any]:
        # saved_at: what a resumed run's TensorBoard logged before this checkpoint (tensorboard_logger.Restart)
        # config: which run's checkpoint this is (resume.refuse_foreign_checkpoint)
        return {"config": self.config, "history": self.history, "train_steps": self.train_steps,
                "epoch_lrs": self.epoch_lrs,
                "first_step_s": self.first_step_s, "saved_at": time.time(),
                "guard": self.guard.state_dict(), "rng_cpu": torch.get_rng_state(),
                # Only where this process uses CUDA: asking would start CUDA in a CPU run on a GPU machine.
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}

    def saved_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """What this record's :meth:`state_dict` put into ``checkpoint`` (empty where nothing)."""
        return checkpoint.get("callbacks", {}).get(self.state_key, {})

    def restart_of(self, checkpoint: dict[str, Any], path: Path) -> Restart:
        """Where a run resumed from ``checkpoint`` (read from ``path``) takes its TensorBoard events over:
        at the checkpoint's step, keeping the earlier events logged before this record was saved into it
        (for a checkpoint of an earlier version, before the file's time)."""
        saved = self.saved_state(checkpoint).get("saved_at")
        return Restart(int(checkpoint.get("global_step", 0)), path.stat().st_mtime if saved is None else saved)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in a fit only: testing a checkpoint (test_ckpt=best) loads it too, and must keep
        # this run's record (the epochs after the best one happened too).
        self._pending_record = self._pending_rng = state_dict

    def restore_record(self) -> None:
        """The resumed run's record (history, per-step rows, guard) from its checkpoint, once."""
        saved, self._pending_record = self._pending_record, None
        if saved is None:
            return
        self.history, self.first_step_s = list(saved["history"]), saved["first_step_s"]
        self.train_steps = list(saved.get("train_steps", []))  # absent from checkpoints of older versions
        self.epoch_lrs = list(saved.get("epoch_lrs", []))
        self.guard.load_state_dict(saved["guard"])
        self._csv_to_rewrite = True

    def rewrite_csv(self, loggers: list[Logger]) -> None:
        """A resumed run's CSV rows from before the resume, once: a new ``CSVLogger`` deletes the
        ``metrics.csv`` it finds, so the rows its checkpoint's record holds are logged again (and saved at
        once), as the run logged them (:func:`logged_in_fit`: each epoch took ``steps_per_epoch`` updates,
        unless the run diverged, stopped by its test and continued with ``resume=auto``). TensorBoard keeps
        its earlier event files."""
        csv_loggers = [logger for logger in loggers if isinstance(logger, CSVLogger)]
        if not self._csv_to_rewrite or not csv_loggers:
            return
        self._csv_to_rewrite = False
        if self.sharpness is not None:
            self.sharpness.restore()
        curvature = self.sharpness.run_record() if self.sharpness is not None else None
        steps = self.guard.step if self.guard.diverged else len(self.history) * self.steps_per_epoch
        replay(csv_loggers, logged_in_fit(self.config, self.history, self.train_steps, curvature, self.steps_per_epoch,
                                          steps,
                                          self.epoch_lrs if len(self.epoch_lrs) >= len(self.history) else None))
        for logger in csv_loggers:
            logger.save()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here, not only when training starts: a resumed run with no epoch left to train never starts
        # training, and its summary must still hold its epochs.
        self.restore_record()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore_record()  # for a strategy that loads the checkpoint after on_fit_start
        self.rewrite_csv(trainer.loggers)  # a resumed run with no epoch left to train never starts training
        self._pending_rng = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore_record()
        self.rewrite_csv(trainer.loggers)  # before anything new is logged
        saved, self._pending_rng = self._pending_rng, None
        if saved is None:
            return
        # Last, after Lightning's own start-up work may have drawn random numbers.
        torch.set_rng_state(saved["rng_cpu"])
        if torch.cuda.is_available():  # the GPUs this machine has (it may have fewer than the saving one)
            for device, state in enumerate(saved["rng_cuda"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)

    # ---- training ---------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_epoch(trainer)
        self.epoch_lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        self._epoch_start, self._train_time, self._steps = time.perf_counter(), None, []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_epoch(trainer)

    def write_epoch(self, trainer: L.Trainer) -> None:
        """The last finished epoch's line and ``running`` summary, once its checkpoint is saved (here,
        the first hook after the checkpoint callbacks'): a kill between the two leaves a summary no
        further than the checkpoint, which a resume continues from."""
        if self._unwritten:
            self._unwritten = False
            log.info(self.epoch_line(self.history[-1], trainer.max_epochs))
            self.write("running", trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.first_step_s is None:
            self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not outputs:  # the guard refused the step
            return
        self._steps.append(outputs)
        step = trainer.global_step - 1  # the update just applied
        if self.first_step_s is None:
            synchronize(pl_module.device)
            self.first_step_s = time.perf_counter() - self._step_start
        if step == 0:
            self._initial_loss = float(outputs["loss"])  # the yardstick for loss spikes (regimes.py)
        if step % self.log_every == 0:
            params = [p for p in pl_module.parameters() if p.grad is not None]
            loss, grad_norm, weight_norm = torch.stack([outputs["loss"].double(), total_norm([p.grad for p in params]),
                                                        total_norm(params)]).tolist()
            row = {"step": step, "loss": loss, "grad_norm": grad_norm, "weight_norm": weight_norm,
                   "lr": float(trainer.optimizers[0].param_groups[0]["lr"])}
            self.train_steps.append(row)
            log_train_step(trainer.loggers, row)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: the epoch's training ends here
            synchronize(pl_module.device)
            self._train_time = time.perf_counter() - self._epoch_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._train_time is None:
            synchronize(pl_module.device)
            self._train_time = time.perf_counter() - self._epoch_start
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1, **self._train_metrics()}
        if self._initial_loss is not None:
            row["train_loss_initial"], self._initial_loss = self._initial_loss, None
        metrics = trainer.callback_metrics
        for stage in EVAL_STAGES:
            for kind in ("loss", "acc"):
                if f"{stage}/{kind}" in metrics:
                    row[f"{stage}_{kind}"] = float(metrics[f"{stage}/{kind}"])
        row["train_time_s"] = self._train_time
        if self.sharpness is not None:  # its epoch has ended: normal callbacks run before checkpoint ones
            row.update(epoch_columns(self.sharpness.epoch_record()))
        self.history.append(row)
        log_epoch(trainer.loggers, row, trainer.global_step)
        self._unwritten = True  # written after the epoch's checkpoint (write_epoch)

    def _train_metrics(self) -> dict[str, float]:
        """This epoch's training loss and accuracy over all its samples, and its largest step loss."""
        if not self._steps:
            return {"train_loss": math.nan, "train_acc": math.nan}
        losses = torch.stack([s["loss"] for s in self._steps]).double()
        sizes = torch.tensor([len(s["target"]) for s in self._steps], dtype=torch.float64, device=losses.device)
        correct = sum((s["logits"].argmax(1) == s["target"]).sum() for s in self._steps)
        loss_sum, correct, loss_max = torch.stack([losses @ sizes, correct.double(), losses.max()]).tolist()
        n = float(sizes.sum())
        self._steps = []
        return {"train_loss": loss_sum / n, "train_acc": correct / n, "train_loss_max": loss_max}

    @staticmethod
    def epoch_line(row: dict[str, float], epochs: int) -> str:
        parts = [f"epoch {row['epoch']:>3}/{epochs}",
                 f"train loss {decimals(row['train_loss'], 4)} acc {row['train_acc']:.4f}"]
        if "val_acc" in row:
            parts.append(f"val loss {decimals(row['val_loss'], 4)} acc {row['val_acc']:.4f}")
        if "test_acc" in row:
            parts.append(f"test acc {row['test_acc']:.4f}")
        parts.append(f"{row['train_time_s']:.1f}s")
        return " | ".join(parts)

    # ---- the summary --------------------------------------------------------------------------
    def summary(self, status: str, trainer: L.Trainer | None = None, **final: Any) -> RunSummary:
        """The run's summary as it stands, with ``status`` and the ``final`` fields given."""
        if trainer is not None:
            self._global_step = trainer.global_step
        return diagnosed_summary(
            status, self.config, self.history, self.train_steps, self.thresholds, diverged=self.guard.diverged,
            diverged_at_step=self.guard.step, divergence_reason=self.guard.reason,
            curvature=self.sharpness.run_record() if self.sharpness is not None else None, steps=self._global_step,
            first_step_s=self.first_step_s, wall_time_s=self.wall_time_before + time.perf_counter() - self.started,
            **self.extra, **final)

    def write(self, status: str, trainer: L.Trainer | None = None, **final: Any) -> RunSummary:
        summary = self.summary(status, trainer, **final)
        write_summary(self.run_dir, summary)
        return summary


def step_scalars(row: dict[str, float]) -> dict[str, float]:
    """One :attr:`~optimlab.summary.RunSummary.train_steps` row as the run's per-step scalars."""
    return {tag: math.nan if row[key] is None else row[key] for key, tag in STEP_SCALARS.items()}


def epoch_scalars(row: dict[str, float]) -> dict[str, float]:
    """An epoch's row as scalars: its training, validation and test loss and accuracy, those it has."""
    return {f"{stage}/{kind}": row[f"{stage}_{kind}"] for stage in ("train", *EVAL_STAGES)
            for kind in ("loss", "acc") if f"{stage}_{kind}" in row}


def log_train_step(loggers: list[Logger], row: dict[str, float]) -> None:
    """A per-step row's scalars at its step."""
    for logger in loggers:
        logger.log_metrics(step_scalars(row), step=int(row["step"]))


def log_epoch(loggers: list[Logger], row: dict[str, float], step: int) -> None:
    """An epoch's scalars at ``step`` (the update count when it ended)."""
    for logger in loggers:
        logger.log_metrics(epoch_scalars(row), step=step)


def logged_in_fit(config: dict[str, Any], epochs: list[dict[str, Any]], train_steps: list[dict[str, float]],
                  curvature: dict[str, Any] | None, steps_per_epoch: int, steps: int,
                  epoch_lrs: list[float] | None = None) -> list[tuple[int, dict[str, float]]]:
    """What a run's loggers received during its fit, as ``(step, scalars)`` in the order received, from
    its record (``steps``: the updates it applied). Before the first epoch, the sharpness at step 0. At
    each epoch's start its lr, as a ``callbacks.lr_monitor`` that logs once an epoch logs it (``epoch_lrs``
    as the run recorded them, else from a stand-in of its config; one that logs more, per step or
    momentum, is left out: its values are not in the record). After update s, the sharpness measured at
    s (:class:`~optimlab.curvature.SharpnessCallback` comes before :class:`RunRecord` in the callbacks),
    then the per-step row of step s - 1. At an epoch's end its row (an epoch whose first step diverged
    ends at the update count the one before it ended at: events are ordered by epoch first)."""
    per_epoch = max(steps_per_epoch, 1)
    # (epoch, phase: 0 before it, 1 its start, 2 its updates, 3 its end; updates applied, order), step, scalars
    events: list[tuple[tuple[int, int, int, int], int, dict[str, float]]] = []
    for step, value, threshold in (curvature or {}).get("series", []):
        step = int(step)
        when = (0, 0, 0, 0) if step == 0 else ((step - 1) // per_epoch, 2, step, 0)
        events.append((when, step, {SHARPNESS_TAG: math.nan if value is None else value,
                                    THRESHOLD_TAG: math.nan if threshold is None else threshold}))
    for row in train_steps:
        step = int(row["step"])
        events.append(((step // per_epoch, 2, step + 1, 1), step, step_scalars(row)))
    for row in epochs:
        epoch = int(row["epoch"])
        events.append(((epoch - 1, 3, 0, 0), min(epoch * steps_per_epoch, steps), epoch_scalars(row)))
    if lr_monitor_followed((config.get("callbacks") or {}).get("lr_monitor") or {}):
        cfg = OmegaConf.create(config)
        lrs = epoch_start_lrs(cfg, len(epochs)) if epoch_lrs is None else epoch_lrs[:len(epochs)]
        tag = lr_monitor_tag(cfg)
        events += [((epoch, 1, 0, 0), epoch * steps_per_epoch, {tag: lr}) for epoch, lr in enumerate(lrs)]
    events.sort(key=lambda event: event[0])
    return [(step, scalars) for _, step, scalars in events]


def replay(loggers: list[Logger], logged: list[tuple[int, dict[str, float]]]) -> None:
    """Log ``logged`` (:func:`logged_in_fit`) again, in its order, into each of ``loggers``."""
    for logger in loggers:
        for step, scalars in logged:
            logger.log_metrics(scalars, step=step)


def close_loggers(loggers: list[Logger], status: str) -> None:
    """End every logger once, after the run's last write (Lightning's own finalize at the end of
    fit and test only flushes ours: one TensorBoard event file per run)."""
    for logger in loggers:
        if isinstance(logger, TensorBoardRunLogger):
            logger.close(status)
        else:
            logger.finalize(status)


def log_result(loggers: list[Logger], summary: RunSummary) -> None:
    """Each logger's hyperparameters against the run's final metrics; in TensorBoard also the regime
    and its evidence as text. TensorBoard's HPARAMS tab shows five hyperparameters by default:
    regime, optimizer, lr, model (with its widths) and seed; its metrics are the run's own curves
    (their last value), so no extra chart group appears."""
    config, run = summary.config, summary.run
    data, last = config.get("data") or {}, (summary.epochs[-1] if summary.epochs else {})
    params = {"regime": summary.regime, "optimizer": run.optimizer, "lr": run.lr,
              "model": f"{run.model} {run.widths}".strip(), "seed": run.seed, "name": run.name,
              "batch_size": config.get("batch_size"), "epochs": config.get("epochs"),
              "label_noise": data.get("label_noise"), "subset": data.get("subset") or 0}
    metrics = {"test/acc": summary.test_acc, "val/acc_best": summary.best_val_acc, "val/acc": last.get("val_acc"),
               "train/loss": last.get("train_loss"), "test/loss": summary.test_loss}
    for logger in loggers:
        if isinstance(logger, TensorBoardRunLogger):  # the HPARAMS table needs a value in every column
            logger.log_hyperparams(params, {k: (math.nan if v is None else float(v)) for k, v in metrics.items()},
                                   step=summary.steps, shown=("regime", "optimizer", "lr", "model", "seed"))
            logger.experiment.add_text("regime", f"**{summary.regime}**\n\n" + "\n\n".join(summary.regime_evidence),
                                       global_step=summary.steps)
        else:  # the epochs' metrics are among its curves (log_epoch); the final test and the best epoch not yet,
            # unless the last epoch was tested with the weights the final test tested (not test_ckpt=best): its row
            # holds the final test's values (no value twice)
            logger.log_hyperparams(params)
            tested = summary.tested_checkpoint != "best" and "test_acc" in last
            final = {k: v for k, v in {"test/acc": None if tested else summary.test_acc,
                                       "test/loss": None if tested else summary.test_loss,
                                       "val/acc_best": summary.best_val_acc}.items() if v is not None}
            if final:
                logger.log_metrics(final, step=summary.steps)


def log_epoch_lines(summary: RunSummary, epochs: int) -> None:
    """The epoch lines of a run recorded elsewhere (a population member), as its own run logs them
    epoch by epoch: into its job's log (``train.log``) and on the console."""
    for row in summary.epochs:
        log.info(RunRecord.epoch_line(row, epochs))


def result_line(s: RunSummary) -> str:
    """The end-of-run lines on the console."""
    test = "n/a" if s.test_acc is None else f"{s.test_acc:.4f}"
    diverged = f" (diverged at step {s.diverged_at_step}: {s.divergence_reason})" if s.diverged else ""
    # The throughput leaves out the first step (warm-up): a one-step run has none to show.
    speed = f"{s.steps_per_s:.1f} steps/s" if s.steps_per_s else f"{s.steps} step{'s' * (s.steps != 1)}"
    if (s.config.get("trainer") or {}).get("compile") and s.first_step_s is not None:
        speed += f" (first step, with compilation: {s.first_step_s:.1f}s)"
    return (f"{s.run}: test acc {test} | regime: {s.regime}{diverged}\n  evidence: " + "; ".join(s.regime_evidence)
            + f"\n  {len(s.epochs)} epoch{'s' * (len(s.epochs) != 1)}, {speed}, {s.wall_time_s:.1f}s wall")
