"""One run: validate the config, build everything once, fit, test, finish the record.

``run(cfg, run_dir)`` is what ``python train.py`` calls for each (multi)run job. It never raises for
a diverging run (that is a result: ``summary.json`` says ``diverged: true``), turns SIGINT/SIGTERM
into a clean stop with an ``interrupted`` summary, and rejects bad input before any work starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from optimlab.build import build_parts, build_trainer, set_torch_options
from optimlab.checkpointing import CHECKPOINT_DIR, last_checkpoint, read_checkpoint
from optimlab.console import warn
from optimlab.curvature import SharpnessCallback
from optimlab.files import held, held_elsewhere, remove_stale_temporaries
from optimlab.command_line import command_line_override
from optimlab.hydra_job import save_job_record
from optimlab.mnist_files import check_batch_limits
from optimlab.record import RunRecord, close_loggers, device_name, holds_nothing_trained, log_result, result_line
from optimlab.resume import (keep_derived_values, override_keys, plan_run, refuse_changed_config,
                             refuse_foreign_checkpoint)
from optimlab.signals import Interrupted, StopOnSignal
from optimlab.summary import SUMMARY, RunSummary, is_complete, read_summary, write_summary
from optimlab.tensorboard_logger import Restart, open_after
from optimlab.validate import ConfigError, FolderInUse, check_shared_folders, tracks_sharpness, validate_config

# Lightning's start-up banners (GPU available, tips) drown the run's own lines.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch.profilers").setLevel(logging.INFO)  # trainer.profiler's report is wanted
log = logging.getLogger(__name__)
warnings.filterwarnings(
    "ignore", message=r".*(LeafSpec|smaller than the logging interval|overridden `transfer_batch_to_device`).*")
# A resumed run's CSVLogger warns that it deletes the metrics.csv it finds: RunRecord.rewrite_csv writes its rows back.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
# And its ModelCheckpoint that its folder holds checkpoints: the run's own (a new run is refused a folder holding one).
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


@contextlib.contextmanager
def _claim(run_dir: Path, cfg: DictConfig, new: bool, planned: RunSummary | None) -> Iterator[None]:
    """Make ``run_dir`` ours for the block, before anything is trained: check that it can be written, hold it
    (:func:`~optimlab.files.held`: a second process resuming the same run is refused, else both would write
    its files), check that its record is still the one the run was planned from (``planned``: another process
    may have written it meanwhile, then let it go), clear what a killed write left, and (for a new run) write
    Hydra's record of the job into ``.hydra/``. Hydra itself writes nothing there (``hydra.output_subdir:
    null``), so a refused run cannot overwrite another run's record."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"hydra.run.dir: cannot write to {run_dir} ({err.strerror}); choose another folder") from None
    with held(run_dir) as ours:
        if not ours:
            raise FolderInUse(f"{run_dir}: another process is running in this folder now (a run holds its folder "
                              "until it ends); wait for it to end, or stop it, then resume")
        if held_elsewhere(run_dir.parent):
            raise FolderInUse(f"{run_dir}: a population sweep (or another run) is running in {run_dir.parent} now, "
                              "which it holds; wait for it to end, or stop it, then resume")
        if read_summary(run_dir) != planned:
            raise ConfigError(f"{run_dir}: another process wrote this run's record while this run was starting; run "
                              "the command again")
        for folder in (run_dir, run_dir / CHECKPOINT_DIR):
            remove_stale_temporaries(folder)
        if new:
            save_job_record(run_dir, cfg)
        yield


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
    recorded = cfg.get("resume") not in (None, "auto")  # then plan_run returns the run's recorded config
    cfg, run_dir, ckpt, previous = plan_run(cfg, run_dir, overrides or [])
    try:
        validate_config(cfg, complete=not recorded)
    except ConfigError as err:  # a value the command did not give: the run's own, refused since it was recorded
        if not recorded or str(err).split(":", 1)[0] in override_keys(overrides or []):
            raise
        raise ConfigError(f"{err}; the run's recorded config ({run_dir / SUMMARY}) holds it, so this version cannot "
                          "continue the run") from None
    if cfg.resume == "auto" and previous is not None:
        refuse_changed_config(run_dir, previous, cfg, checkpointed=ckpt is not None)
        if ckpt is not None:
            keep_derived_values(cfg, previous.config)
    if cfg.resume == "auto" and is_complete(run_dir):
        log.info(f"{run_dir}: already complete, skipped (resume=auto)")
        return previous  # type: ignore[return-value]
    if holds_nothing_trained(run_dir):  # a new run, resume=auto's too (its own run continues its files there)
        check_shared_folders(cfg)
    if cfg.resume == "auto" and previous is None and ckpt is None:  # e.g. a single run's new, timestamped folder
        log.info(f"resume=auto: {run_dir} holds no run to continue; starting a new one (resume=<run dir> continues "
                 f"a given run)")
    set_torch_options(cfg.trainer)
    L.seed_everything(cfg.seed, verbose=False)
    parts = build_parts(cfg)
    datamodule, module = parts.datamodule, parts.module
    checkpoint = read_checkpoint(ckpt, module) if ckpt is not None else None
    datamodule.setup()  # reads and checks the files: a DataError stops us before anything is written
    steps_per_epoch = check_batch_limits(cfg.trainer, (len(datamodule.train_y), len(datamodule.val_y),
                                                       len(datamodule.test_y)), datamodule.batch_size,
                                         datamodule.eval_batch_size)
    config = OmegaConf.to_container(cfg, resolve=True)
    curvature = cfg.get("curvature")
    sharpness = (SharpnessCallback(curvature.every_n_steps, curvature.probe_size, cfg.seed, iters=curvature.iters,
                                   tol=curvature.tol, log_spaced_start=curvature.log_spaced_start)
                 if tracks_sharpness(cfg) else None)
    record = RunRecord(run_dir, config, module.guard, parts.thresholds, cfg.trainer.log_every_n_steps,
                       wall_time_before=previous.wall_time_s if previous and ckpt else 0.0, sharpness=sharpness,
                       steps_per_epoch=steps_per_epoch)
    # Where this session's events take over from earlier ones in the folder (none: it starts over).
    restart = record.restart_of(checkpoint, ckpt) if ckpt is not None and checkpoint is not None else Restart(0)
    if ckpt is not None and checkpoint is not None:
        refuse_foreign_checkpoint(ckpt, record.saved_state(checkpoint), cfg)
    trainer = build_trainer(cfg, run_dir, [stopper := StopOnSignal(), *filter(None, [sharpness]), record], restart)
    datamodule.to(trainer.strategy.root_device)
    record.extra = {"params": sum(p.numel() for p in module.model.parameters()), "train_size": len(datamodule.train_y),
                    "label_noise_images": datamodule.noisy_count, "device": device_name(trainer.strategy.root_device)}
    # a new run writes Hydra's record of its job; so does resume=auto over a run that trained nothing (a refused job)
    new = ckpt is None and (previous is None or (cfg.resume == "auto" and not previous.epochs))
    with _claim(run_dir, cfg, new, previous), logging_into(run_dir), stopper.handling():
        open_after(trainer.loggers, restart, run_dir)
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
            held = ("the last checkpoint and summary" if last_checkpoint(run_dir) is not None else
                    "its summary (no checkpoint yet)")
            warn(f"interrupted after {len(record.history)} finished epoch(s); {run_dir} holds {held}; continue with "
                 f"{command_line_override('resume', str(run_dir))}")
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
