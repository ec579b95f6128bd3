"""One run: build everything from the composed config, train, test, diagnose, write the record.

``run(cfg, run_dir)`` is what ``python train.py`` calls for each (multi)run job. It never raises for
a diverging run (that is a result: ``summary.json`` says ``diverged: true``), turns SIGINT/SIGTERM
into a clean stop with an ``interrupted`` summary, and rejects bad input before any work starts.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from optimlab.checkpointing import CHECKPOINT_DIR, LAST, AtomicCheckpointIO, last_checkpoint, resolve_resume
from optimlab.data import MNISTDataModule
from optimlab.module import ClassifierModule
from optimlab.regimes import Thresholds, diagnose
from optimlab.summary import SUMMARY, is_complete, read_summary, write_summary
from optimlab.validate import ConfigError, regime_overrides, validate_config


# Lightning's start-up banners (GPU available, tips) drown the run's own lines.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|smaller than the logging interval|overridden `transfer_batch_to_device`).*")


class Interrupted(Exception):
    """The run was stopped by SIGINT or SIGTERM."""


def build_optimizer(cfg: DictConfig) -> Callable[..., torch.optim.Optimizer]:
    """A partial taking the parameters (the config's ``_target_`` with ``_partial_``). ``impl: torch``
    swaps in torch.optim's class of the same name with the same hyperparameters, for run-against-run
    comparisons."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    target, impl = kwargs.pop("_target_"), kwargs.pop("impl", "custom")
    kwargs.pop("_partial_", None)
    if impl == "torch":
        target = "torch.optim." + target.rsplit(".", 1)[1]
        kwargs.pop("grad_noise_std", None)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return functools.partial(get_class(target), **kwargs)


def build_module(cfg: DictConfig) -> ClassifierModule:
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    return ClassifierModule(instantiate(cfg.model), build_optimizer(cfg.optimizer), scheduler,
                            log_every_n_steps=cfg.trainer.log_every_n_steps,
                            check_finite_every_n_steps=cfg.trainer.check_finite_every_n_steps,
                            compile=cfg.trainer.compile)


def check_buildable(cfg: DictConfig) -> None:
    """Build the optimizer and the model once on the CPU, so their own argument checks run before
    any data is read; their errors become one-line ConfigErrors."""
    for key, build in (("optimizer", lambda: build_optimizer(cfg.optimizer)([torch.zeros(1, requires_grad=True)])),
                       ("model", lambda: instantiate(cfg.model))):
        try:
            build()
        except Exception as err:
            while err.__cause__ is not None:  # hydra's instantiate wraps the real error
                err = err.__cause__
            raise ConfigError(f"{key}: {err}") from None


class RunRecorder(Checkpoint):
    """After every epoch (and after Lightning's own checkpoint, as a Checkpoint callback runs last):
    print one line and rewrite ``summary.json``, so a killed run loses at most the current epoch."""

    def __init__(self, write: Callable[[str], None], epochs: int) -> None:
        self.write, self.epochs = write, epochs

    def on_train_epoch_end(self, trainer: L.Trainer, module: ClassifierModule) -> None:
        row = module.history[-1]
        parts = [f"epoch {row['epoch']:>3}/{self.epochs}",
                 f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"]
        if "val_acc" in row:
            parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}")
        if "test_acc" in row:
            parts.append(f"test acc {row['test_acc']:.4f}")
        parts.append(f"{row['train_time_s']:.1f}s")
        print(" | ".join(parts), flush=True)
        self.write("running")


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class StopOnSignal(L.Callback):
    """SIGINT and SIGTERM raise KeyboardInterrupt, which Lightning turns into a graceful shutdown.
    Python drops an exception raised while a finalizer (``__del__``) runs, so the request is also
    remembered and raised again at the next batch."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        raise KeyboardInterrupt(self.requested)

    def _raise_if_requested(self, *args: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(self.requested)

    on_train_batch_start = on_validation_batch_start = _raise_if_requested


def _resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path, Path | None]:
    """For ``resume=<run dir or ckpt>``: that run's saved config (``epochs`` may be raised from the
    command line to extend it), its directory and its checkpoint."""
    run_dir, ckpt = resolve_resume(cfg.resume)
    saved = read_summary(run_dir)
    if saved is None or "config" not in saved:
        raise ConfigError(f"resume: {cfg.resume!r} holds no {SUMMARY} with the run's config")
    resumed = OmegaConf.create(saved["config"])
    with open_dict(resumed):
        resumed.resume = str(cfg.resume)
        if any(o.startswith("epochs=") for o in overrides):
            resumed.epochs = cfg.epochs
    return resumed, run_dir, ckpt


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one configuration into ``run_dir``; return its summary."""
    started = time.perf_counter()
    validate_config(cfg)
    ckpt: Path | None = None
    if cfg.resume == "auto":
        if is_complete(run_dir):
            print(f"{run_dir}: already complete, skipped (resume=auto)")
            return read_summary(run_dir) or {}
        ckpt = last_checkpoint(run_dir)
    elif cfg.resume:
        cfg, run_dir, ckpt = _resumed_config(cfg, overrides or [])
        validate_config(cfg)
    elif read_summary(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; pass resume=auto to skip or continue it, "
                          f"or choose another hydra.run.dir / hydra.sweep.dir")
    check_buildable(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = read_summary(run_dir) if ckpt is not None else None
    wall_before = (previous or {}).get("wall_time_s") or 0.0

    torch.set_flush_denormal(cfg.trainer.flush_denormal)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule: MNISTDataModule = instantiate(cfg.data)
    datamodule.setup()  # reads and checks the files: a DataError stops us before training
    module = build_module(cfg)
    trainer = _trainer(cfg, run_dir)
    datamodule.to(trainer.strategy.root_device)
    thresholds = Thresholds.from_overrides(regime_overrides(cfg))

    def record(status: str, **final: Any) -> dict[str, Any]:
        history = module.history
        diverged = module.diverged_at_step is not None
        diagnosis = diagnose(history, diverged, thresholds)
        train_time = sum(row.get("train_time_s", 0.0) for row in history)
        # Throughput leaves out the first step: warm-up, and compilation with trainer.compile=true
        # (reported on its own as first_step_s).
        steady_steps, steady_time = trainer.global_step - 1, train_time - (module.first_step_s or 0.0)
        summary = {
            "status": status, "interrupted": status == "interrupted", "name": cfg.name,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "params": sum(p.numel() for p in module.model.parameters()),
            "epochs": history, "epochs_completed": len(history),
            "test_loss": final.get("test_loss"), "test_acc": final.get("test_acc"),
            "best_val_acc": max((r["val_acc"] for r in history if _finite(r.get("val_acc"))), default=None),
            "diverged": diverged, "diverged_at_step": module.diverged_at_step,
            "divergence_reason": module.divergence_reason,
            "regime": diagnosis.regime, "regime_evidence": diagnosis.evidence,
            "regime_measures": diagnosis.measures,
            "steps": trainer.global_step, "train_time_s": train_time,
            "steps_per_s": steady_steps / steady_time if steady_steps > 0 and steady_time > 0 else None,
            "first_step_s": module.first_step_s,
            "wall_time_s": wall_before + time.perf_counter() - started,
            "label_noise_images": datamodule.noisy_count, "train_size": len(datamodule.train_y),
            "device": _device_name(trainer.strategy.root_device), "versions": _versions(),
            **final,
        }
        write_summary(run_dir, summary)
        return summary

    trainer.callbacks.append(RunRecorder(record, cfg.epochs))
    if ckpt is None:
        record("running")  # a resumed run keeps its summary until its next epoch ends
    else:
        print(f"resuming {run_dir} from {ckpt}")
    stopper = StopOnSignal()
    trainer.callbacks.append(stopper)
    old_handlers = {s: signal.signal(s, stopper.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    except (SystemExit, KeyboardInterrupt):  # Lightning exits after its graceful shutdown
        trainer.logger.finalize("interrupted")
        record("interrupted")
        print(f"interrupted after {len(module.history)} finished epoch(s); {run_dir} holds the last "
              f"checkpoint and summary; continue with resume={run_dir}", file=sys.stderr)
        raise Interrupted from None
    except Exception as err:  # a crash is recorded, then reported as usual
        record("crashed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
    return _finish(cfg, run_dir, trainer, module, datamodule, record)


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def _finish(cfg: DictConfig, run_dir: Path, trainer: L.Trainer, module: ClassifierModule,
            datamodule: MNISTDataModule, record: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Test the chosen weights, diagnose, log the result to TensorBoard and write the final summary."""
    best = trainer.checkpoint_callback.best_model_path  # the first ModelCheckpoint: best by early_stopping.monitor
    use_best = cfg.test_ckpt == "best" and best
    results = trainer.test(module, datamodule=datamodule, ckpt_path=best if use_best else None, verbose=False)
    test = results[0] if results else {}
    status = "diverged" if module.diverged_at_step is not None else "complete"
    summary = record(status, test_loss=test.get("test/loss"), test_acc=test.get("test/acc"),
                     tested_checkpoint="best" if use_best else "last")
    _log_result(trainer.logger, cfg, summary)
    print(_result_line(summary))
    return summary


def _log_result(logger: TensorBoardLogger, cfg: DictConfig, summary: dict[str, Any]) -> None:
    """HPARAMS tab: the run's knobs against its real final metrics; the regime as text."""
    params = {"name": cfg.name, "model": cfg.model._target_.rsplit(".", 1)[1],
              "optimizer": cfg.optimizer._target_.rsplit(".", 1)[1], "impl": cfg.optimizer.impl,
              "lr": cfg.lr, "batch_size": cfg.batch_size, "epochs": cfg.epochs, "seed": cfg.seed,
              "widths": str(list(cfg.model.get("hidden") or cfg.model.get("channels") or [])),
              "label_noise": cfg.data.label_noise, "subset": cfg.data.subset or 0, "regime": summary["regime"]}
    metrics = {"hp/test_acc": summary["test_acc"], "hp/test_loss": summary["test_loss"],
               "hp/best_val_acc": summary["best_val_acc"], "hp/diverged": float(summary["diverged"]),
               "hp/steps_per_s": summary["steps_per_s"]}
    logger.log_hyperparams(params, {k: (math.nan if v is None else float(v)) for k, v in metrics.items()})
    logger.experiment.add_text("regime", f"**{summary['regime']}**\n\n" + "\n\n".join(summary["regime_evidence"]))
    logger.finalize("success")


def _result_line(s: dict[str, Any]) -> str:
    test = "n/a" if s["test_acc"] is None else f"{s['test_acc']:.4f}"
    diverged = f" (diverged at step {s['diverged_at_step']}: {s['divergence_reason']})" if s["diverged"] else ""
    speed = f"{s['steps_per_s']:.1f} steps/s" if s["steps_per_s"] else "no steps"
    if s["config"]["trainer"]["compile"] and s["first_step_s"] is not None:
        speed += f" (first step, with compilation: {s['first_step_s']:.1f}s)"
    return (f"test acc {test} | regime: {s['regime']}{diverged}\n  evidence: " + "; ".join(s["regime_evidence"])
            + f"\n  {s['epochs_completed']} epochs, {speed}, {s['wall_time_s']:.1f}s wall")


def _trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    t = cfg.trainer
    # Two checkpoints: the best by early_stopping.monitor, and every finished epoch. (ModelCheckpoint's
    # own save_last only writes when the monitored one improved, which would leave "last" behind.)
    es = cfg.early_stopping
    best, last = (ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename=name, monitor=monitor, mode=es.mode,
                                  save_top_k=1, save_on_train_epoch_end=True, auto_insert_metric_name=False,
                                  enable_version_counter=False)
                  for name, monitor in (("best", es.monitor), (LAST.removesuffix(".ckpt"), None)))
    callbacks: list[Any] = [best, last]
    if es.enabled:
        callbacks.append(EarlyStopping(monitor=es.monitor, mode=es.mode, patience=es.patience, min_delta=es.min_delta))
    show_bar = t.progress_bar and sys.stderr.isatty()
    if show_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, precision=t.precision, deterministic=t.deterministic,
        max_epochs=cfg.epochs, log_every_n_steps=t.log_every_n_steps, fast_dev_run=t.fast_dev_run,
        limit_train_batches=t.limit_train_batches, num_sanity_val_steps=0, enable_model_summary=False,
        enable_progress_bar=show_bar, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False),
        default_root_dir=str(run_dir),
    )

