"""One run: validate the config, build everything once, fit, test, finish the record.

``run(cfg, run_dir)`` is what ``python train.py`` calls for each (multi)run job. It never raises for
a diverging run (that is a result: ``summary.json`` says ``diverged: true``), turns SIGINT/SIGTERM
into a clean stop with an ``interrupted`` summary, and rejects bad input before any work starts.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import to_absolute_path
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict

from optimlab.build import build_parts, build_trainer
from optimlab.checkpointing import CHECKPOINT_DIR, LAST, holds_a_run, last_checkpoint, read_checkpoint, resolve_resume
from optimlab.console import BarSafeHandler
from optimlab.curvature import SharpnessCallback
from optimlab.files import remove_stale_temporaries
from optimlab.hydra_job import command_line_override, save_job_record
from optimlab.mnist_files import epoch_batches
from optimlab.record import RunRecord, close_loggers, device_name, log_result, result_line
from optimlab.summary import (FINISHED, SUMMARY, RunSummary, dotted_value, drop_keys, is_complete, read_summary,
                              write_summary)
from optimlab.tensorboard_logger import Restart, open_after
from optimlab.validate import ConfigError, rule_error, validate_config

# Lightning's start-up banners (GPU available, tips) drown the run's own lines.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.profilers").setLevel(logging.INFO)  # trainer.profiler's report is wanted
log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|smaller than the logging interval|overridden `transfer_batch_to_device`).*")
# A resumed run's CSVLogger warns that it deletes the metrics.csv it finds: RunRecord.rewrite_csv writes its rows back.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
# And its ModelCheckpoint that its folder holds checkpoints: the run's own (a new run is refused a folder holding one).
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class Interrupted(Exception):
    """The run was stopped by SIGINT or SIGTERM."""


class StopOnSignal(L.Callback):
    """SIGINT and SIGTERM raise KeyboardInterrupt, which Lightning turns into a graceful shutdown.
    Python drops an exception raised while a finalizer (``__del__``) runs, so the request is also
    remembered and raised again at the next batch. From the end of an epoch's training until its
    checkpoint is saved (the checkpoint callbacks' epoch-end hooks run after every other's) a signal
    is only remembered: a stop in between would leave the run's record holding an epoch that no
    checkpoint holds. So this callback must come before the run's record among the callbacks. So is a
    signal that arrives while a console line is being written (``BarSafeHandler.writing``)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.deferring = False

    def handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        if not self.deferring and not BarSafeHandler.writing:  # else raised at the next batch
            raise KeyboardInterrupt(self.requested)

    def _raise_if_requested(self, *args: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(self.requested)

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = _raise_if_requested

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.deferring = True

    def _checkpoint_saved(self, *args: Any) -> None:
        self.deferring = False  # a remembered request is raised at the next batch

    on_train_epoch_start = on_train_end = _checkpoint_saved

    def handling(self) -> contextlib.AbstractContextManager[None]:
        """:meth:`handle` installed for SIGINT and SIGTERM inside the block."""
        return stop_signals_handled_by(self.handle)


@contextlib.contextmanager
def stop_signals_handled_by(handler: Any) -> Iterator[None]:
    """``handler`` installed for SIGINT and SIGTERM inside the block; the previous handlers after it."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, previous in old.items():
            signal.signal(s, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[list[str]]:
    """SIGINT and SIGTERM only noted inside the block (their names, in the list it yields): for work
    that a stop must not cut in half, and that takes seconds."""
    received: list[str] = []
    with stop_signals_handled_by(lambda signum, frame: received.append(signal.Signals(signum).name)):
        yield received


# What a resumed run takes from the command line; everything else comes from its own saved config.
RESUME_OVERRIDES = ("resume", "epochs", "trainer.max_epochs", "trainer.progress_bar", "trainer.num_threads",
                    "data.root")
# What a continued run's config may differ in from the one it recorded: those, and the population
# launcher's plan (which jobs train together).
MAY_DIFFER_ON_RESUME = (*RESUME_OVERRIDES, "population")


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (resolved, as a plain dict) without the :data:`MAY_DIFFER_ON_RESUME` keys."""
    config = copy.deepcopy(config)
    drop_keys(config, MAY_DIFFER_ON_RESUME)
    return config


def override_keys(overrides: list[str]) -> list[str]:
    """The keys command-line ``overrides`` set (``+a.b=1`` and ``~a.b`` too)."""
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides]


def sync_epochs(cfg: DictConfig, keys: list[str]) -> None:
    """``epochs`` and ``trainer.max_epochs`` are one setting: the one given on the command line sets
    both (a config composed without overrides has them equal through the interpolation)."""
    given = {key: OmegaConf.select(cfg, key) for key in ("epochs", "trainer.max_epochs") if key in keys}
    if len(set(given.values())) > 1:
        raise ConfigError(f"trainer.max_epochs: {given['trainer.max_epochs']!r} contradicts epochs: "
                          f"{given['epochs']!r}; they are one setting, give one of them")
    if any(rule_error(key, OmegaConf.select(cfg, key)) for key in ("epochs", "trainer.max_epochs")):
        return  # validation names the bad key and value as given
    with open_dict(cfg):
        cfg.epochs = cfg.trainer.max_epochs = next(iter(given.values()), cfg.trainer.max_epochs)


def _recorded_config(config: dict[str, Any], current: DictConfig) -> DictConfig:
    """A run's saved config, brought up to today's keys: a run recorded before the Trainer, callbacks
    and logger came from config (2026-12-03) gets today's defaults for them, and its early-stopping
    settings move to ``callbacks.early_stopping``."""
    config = dict(config)
    early = config.pop("early_stopping", None)
    for key in ("callbacks", "logger", "optimized_metric"):
        if key not in config and key in current:
            value = current[key]
            config[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if "_target_" not in config.get("trainer", {}):
        config["trainer"] = {**OmegaConf.to_container(current.trainer), **config.get("trainer", {}),
                             "max_epochs": config.get("epochs")}
    if early:  # its monitor and mode chose best.ckpt, enabled or not
        best = {"monitor": early["monitor"], "mode": early["mode"]}
        callbacks = config["callbacks"] = dict(config["callbacks"])
        callbacks["model_checkpoint"] = {**callbacks["model_checkpoint"], **best}
        if early.get("enabled"):
            callbacks["early_stopping"] = {"_target_": "lightning.pytorch.callbacks.EarlyStopping", **best,
                                           "patience": early["patience"], "min_delta": early["min_delta"]}
    return OmegaConf.create(config)


def _plan(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[DictConfig, Path, Path | None, RunSummary | None]:
    """(config to run, run dir, checkpoint to resume from, the run's summary so far) for a new run,
    ``resume=auto`` or ``resume=<run dir or ckpt>``; refuses to overwrite a run."""
    keys = override_keys(overrides)
    if not cfg.resume or cfg.resume == "auto":
        sync_epochs(cfg, keys)
    if cfg.resume == "auto":
        ckpt, saved = last_checkpoint(run_dir), read_summary(run_dir)
        if saved is not None and saved.status not in FINISHED:  # a finished run is skipped
            refuse_starting_over(run_dir, ckpt, saved)
        return cfg, run_dir, ckpt, saved
    if cfg.resume:
        ignored = [o for o, key in zip(overrides, keys) if key not in RESUME_OVERRIDES]
        if ignored:
            raise ConfigError(f"resume: a resumed run keeps its own config, so {', '.join(ignored)} would be ignored; "
                              f"only {', '.join(RESUME_OVERRIDES[1:])} may be given with resume=")
        target = Path(to_absolute_path(str(cfg.resume)))  # the launching folder's, also under hydra.job.chdir
        if not target.exists():
            raise ConfigError(f"resume: {cfg.resume!r} does not exist; give a run directory, a .ckpt file or 'auto'")
        run_dir, ckpt = resolve_resume(target)
        saved = read_summary(run_dir)
        if saved is None:
            raise ConfigError(f"resume: {cfg.resume!r} holds no readable {SUMMARY} with the run's config")
        if saved.diverged:
            raise ConfigError(f"resume: {run_dir} diverged at step {saved.diverged_at_step}; a diverged run has "
                              f"nothing to continue (start a new run with other settings)")
        resumed = _recorded_config(saved.config, cfg)
        with open_dict(resumed):
            resumed.resume = str(cfg.resume)
            for key in set(keys) & set(RESUME_OVERRIDES[1:]):  # e.g. a finished run extended by epochs=N
                OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
        sync_epochs(resumed, keys)
        refuse_starting_over(run_dir, ckpt, saved)
        done = len(saved.epochs)
        if rule_error("epochs", resumed.epochs):
            return resumed, run_dir, ckpt, saved  # validation names the bad value
        if resumed.epochs < done or (resumed.epochs == done and saved.status in FINISHED):
            raise ConfigError(f"resume: {run_dir} has finished {done} epoch(s), so epochs={resumed.epochs} leaves "
                              f"nothing to train; give epochs={done + 1} or more to extend it")
        if saved.status in FINISHED and not {"epochs", "trainer.max_epochs"} & set(keys):  # e.g. stopped early
            raise ConfigError(f"resume: {run_dir} is {saved.status} after {done} epoch(s) of {resumed.epochs}; "
                              f"give epochs=N to continue it (early stopping may stop it again)")
        return resumed, run_dir, ckpt, saved
    if holds_a_run(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; pass resume=auto to skip or continue it, "
                          f"or choose another hydra.run.dir / hydra.sweep.dir")
    return cfg, run_dir, None, None


def refuse_starting_over(run_dir: Path, ckpt: Path | None, saved: RunSummary) -> None:
    """Raise ConfigError for a resume of a run that has finished epochs but no checkpoint: it would
    start over in place, and its record would be gone if it were stopped."""
    done = len(saved.epochs)
    if ckpt is None and done:
        if not saved.population:
            why = f"{run_dir / CHECKPOINT_DIR} holds no {LAST}; train it anew into another folder"
        elif saved.status in FINISHED:
            why = (f"a member of a population keeps none, and {saved.population.get('name')}'s was removed when it "
                   f"finished; train it anew into another folder")
        else:
            why = ("a member of a population keeps none: its population's is in the sweep folder's .populations/; "
                   "rerun the sweep with hydra/launcher=population and the same grouping")
        raise ConfigError(f"resume: {run_dir} has {done} finished epoch(s) but no checkpoint to continue from "
                          f"({why}); nothing was changed")


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for each leaf key both configs have with different values."""
    for key in old.keys() & new.keys():
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            yield from differences(old[key], new[key], f"{prefix}{key}.")
        elif old[key] != new[key]:
            yield f"{prefix}{key}", old[key], new[key]


def interpolates_resume_keys(raw: dict[str, Any], dotted: str) -> bool:
    """Whether the unresolved config ``raw`` has at ``dotted`` an interpolation of a
    :data:`MAY_DIFFER_ON_RESUME` key (``${epochs}``)."""
    value = dotted_value(raw, dotted)
    return isinstance(value, str) and any(re.search(r"\$\{[^}]*(?<![\w.])" + re.escape(key) + r"(?!\w)", value)
                                          for key in MAY_DIFFER_ON_RESUME)


def keep_derived_values(cfg: DictConfig, recorded: dict[str, Any]) -> None:
    """Set in ``cfg`` (a ``resume=auto`` run's, :func:`refuse_changed_config` passed) the ``recorded``
    value of every key that differs from it only because it derives from a key a resume may change: the
    continued run uses the recorded one (a cosine's ``T_max: ${epochs}`` is in its scheduler's state, which
    comes from the checkpoint), and its summary must say so."""
    now = comparable(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        for key, value, _ in list(differences(comparable(recorded), now)):
            OmegaConf.update(cfg, key, value, merge=False)


def refuse_changed_config(run_dir: Path, saved: RunSummary, cfg: DictConfig, checkpointed: bool = False) -> None:
    """Raise ConfigError where ``resume=auto`` would continue the run in ``run_dir`` (one with finished
    epochs, or ``checkpointed``) with another config than it recorded: the run would mix two. Not
    compared: :data:`MAY_DIFFER_ON_RESUME` and what derives from them (``cfg`` is resolved with their
    recorded values), and a key only one of them has (one added since the run was recorded)."""
    if not (saved.epochs or checkpointed):
        return  # nothing to continue (e.g. a job refused before any work, its config since fixed)
    recorded = OmegaConf.create(saved.config)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in MAY_DIFFER_ON_RESUME:
            value = OmegaConf.select(recorded, key, default=None)
            if value is not None and OmegaConf.select(cfg, key, default=None) is not None:
                OmegaConf.update(cfg, key, value, merge=False)

    # A value that interpolates a key a resume may change is the recorded one where a run was continued
    # (keep_derived_values): T_max 2 recorded beside epochs 3, which ${epochs} would make 3.
    raw = OmegaConf.to_container(cfg, resolve=False)
    changed = sorted(f"{key}: {old!r} there, {new!r} here" for key, old, new in
                     differences(comparable(saved.config), comparable(OmegaConf.to_container(cfg, resolve=True)))
                     if not interpolates_resume_keys(raw, key))
    if changed:
        raise ConfigError(f"resume=auto: {run_dir} holds a run of another config ({'; '.join(changed[:3])}"
                          f"{'; ...' if len(changed) > 3 else ''}); continuing it would mix the two: rerun with "
                          f"its values, or into another folder")


def _claim(run_dir: Path, cfg: DictConfig, new: bool) -> None:
    """Make ``run_dir`` ours, before anything is trained: check that it can be written, clear what a
    killed write left, and (for a new run) write Hydra's record of the job into ``.hydra/``. Hydra
    itself writes nothing there (``hydra.output_subdir: null``), so a refused run cannot overwrite
    another run's record."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"hydra.run.dir: cannot write to {run_dir} ({err.strerror}); choose another folder") from None
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        remove_stale_temporaries(folder)
    if new:
        save_job_record(run_dir, cfg)


@contextlib.contextmanager
def logging_into(run_dir: Path) -> Iterator[None]:
    """The log lines in ``run_dir``'s log file (appended) instead of the job's own (Hydra's, whose
    formatting it copies) when that file is elsewhere: a run resumed with ``resume=<run dir>`` runs
    in that folder, its log gets the session, and the folder Hydra made for the command stays empty
    (removed at the end, :func:`~optimlab.hydra_job.remove_if_new_and_empty`)."""
    root = logging.getLogger()
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if not files or any(Path(h.baseFilename).parent == run_dir.absolute() for h in files):
        yield
        return
    handler = logging.FileHandler(run_dir / Path(files[0].baseFilename).name, delay=True)
    handler.setFormatter(files[0].formatter)
    handler.setLevel(files[0].level)
    for job_file in files:
        root.removeHandler(job_file)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for job_file in files:
            root.addHandler(job_file)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> RunSummary:
    """Train one configuration into ``run_dir``; return its summary."""
    cfg, run_dir, ckpt, previous = _plan(cfg, run_dir, overrides or [])
    validate_config(cfg)
    if cfg.resume == "auto" and previous is not None and previous.status not in FINISHED:
        refuse_changed_config(run_dir, previous, cfg, checkpointed=ckpt is not None)
        if ckpt is not None:
            keep_derived_values(cfg, previous.config)
    if cfg.resume == "auto" and is_complete(run_dir):
        log.info(f"{run_dir}: already complete, skipped (resume=auto)")
        return previous  # type: ignore[return-value]
    torch.set_flush_denormal(cfg.trainer.flush_denormal)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.seed, verbose=False)
    parts = build_parts(cfg)
    datamodule, module = parts.datamodule, parts.module
    checkpoint = read_checkpoint(ckpt, module) if ckpt is not None else None
    datamodule.setup()  # reads and checks the files: a DataError stops us before anything is written
    # Lightning trains on trainer.overfit_batches batches instead, where that is above 0.
    limit_key = "trainer.overfit_batches" if cfg.trainer.overfit_batches else "trainer.limit_train_batches"
    steps_per_epoch = epoch_batches(len(datamodule.train_y), datamodule.batch_size, OmegaConf.select(cfg, limit_key),
                                    limit_key)
    config = OmegaConf.to_container(cfg, resolve=True)
    curvature = cfg.get("curvature")  # absent from the configs of runs recorded before it existed
    sharpness = (SharpnessCallback(curvature.every_n_steps, curvature.probe_size, cfg.seed, iters=curvature.iters,
                                   tol=curvature.tol, log_spaced_start=curvature.log_spaced_start)
                 if curvature and curvature.every_n_steps else None)
    record = RunRecord(run_dir, config, module.guard, parts.thresholds, cfg.trainer.log_every_n_steps,
                       wall_time_before=previous.wall_time_s if previous and ckpt else 0.0, sharpness=sharpness,
                       steps_per_epoch=steps_per_epoch)
    # Where this session's events take over from earlier ones in the folder (none: it starts over).
    restart = record.restart_of(checkpoint, ckpt) if ckpt is not None and checkpoint is not None else Restart(0)
    trainer = build_trainer(cfg, run_dir, [stopper := StopOnSignal(), *filter(None, [sharpness]), record], restart)
    datamodule.to(trainer.strategy.root_device)
    record.extra = {"params": sum(p.numel() for p in module.model.parameters()), "train_size": len(datamodule.train_y),
                    "label_noise_images": datamodule.noisy_count, "device": device_name(trainer.strategy.root_device)}
    _claim(run_dir, cfg, new=ckpt is None and previous is None)
    open_after(trainer.loggers, restart, run_dir)
    with logging_into(run_dir), stopper.handling():
        if ckpt is None:
            record.write("running")  # a resumed run keeps its summary until its next epoch ends
        else:
            log.info(f"resuming {run_dir} from {ckpt}")
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
            status = "diverged" if module.guard.diverged else "complete"
            # callbacks.model_checkpoint keeps the best epoch by its monitor (last.ckpt has none). Its file
            # is missing when every save was refused (non-finite weights, AtomicCheckpointIO): the last weights.
            best = next((c.best_model_path for c in trainer.checkpoint_callbacks
                         if isinstance(c, ModelCheckpoint) and c.monitor), "")
            use_best = cfg.test_ckpt == "best" and bool(best) and Path(best).is_file()
            trainer.test(module, datamodule=datamodule, ckpt_path=best if use_best else None, verbose=False)
            if stopper.requested:  # Lightning's graceful shutdown ends trainer.test without raising
                raise KeyboardInterrupt(stopper.requested)
            test = {key: float(value) for key, value in trainer.callback_metrics.items()}  # the test's, now
            summary = record.summary(status, trainer, test_loss=test.get("test/loss"), test_acc=test.get("test/acc"),
                                     tested_checkpoint="best" if use_best else "last")
            # Inside the try: a logger that fails to write its last events leaves a crashed record, not a running one.
            log_result(trainer.loggers, summary)
            close_loggers(trainer.loggers, "success")
        except (SystemExit, KeyboardInterrupt):  # Lightning exits after its graceful shutdown
            with contextlib.suppress(Exception):  # stopped after its record came back, before training started
                record.rewrite_csv(trainer.loggers)
            close_loggers(trainer.loggers, "interrupted")
            if ckpt is None or record.history:  # a resumed run stopped before its record came back keeps the old one
                record.write("interrupted", trainer)
            print(f"interrupted after {len(record.history)} finished epoch(s); {run_dir} holds the last "
                  f"checkpoint and summary; continue with {command_line_override('resume', str(run_dir))}",
                  file=sys.stderr)
            raise Interrupted(stopper.requested or "SIGINT") from None
        except Exception as err:  # a crash is recorded, then reported as usual ...
            with contextlib.suppress(Exception):  # the crash may be a logger's own: its error is the one reported
                record.rewrite_csv(trainer.loggers)
            if ckpt is None or record.history:  # ... unless the resumed record was never loaded: keep the old one
                record.write("crashed", trainer, error=f"{type(err).__name__}: {err}")
            raise
        write_summary(run_dir, summary)  # last: a finished summary is what resume=auto skips
        log.info(result_line(summary))
    return summary
