"""A sweep planned as populations: each job's config composed as Hydra's BasicLauncher composes it,
checked and sorted (invalid: fails alone; not reproducible by a population, or its folder holds a run:
alone; else its population key), the jobs with equal keys grouped and split by ``max_members`` and by
the memory a population may use on its device (:func:`estimate_memory`, :class:`MemoryBudget`), and
the plan printed (:func:`plan_text`). :mod:`optimlab.population.launcher` runs it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
import torch
from hydra.errors import CompactHydraException
from hydra.types import HydraContext
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from optimlab.build import build_parts, optimizer_class
from optimlab.checkpointing import holds_a_run, last_checkpoint
from optimlab.curvature.tracking import measurement_iters
from optimlab.data import load_split, split_indices
from optimlab.files import held_elsewhere
from optimlab.hydra_job import hydra_config_of, set_output_dir
from optimlab.lr_schedule import lr_monitor_unfollowed
from optimlab.mnist_files import DataError, check_batch_limits, ensure_files, resolve_root
from optimlab.optim import Optimizer
from optimlab.population.best import followed as best_followed
from optimlab.population.checkpoint import PopulationCheckpoint
from optimlab.population.cluster import Executor, ForkedJob, can_fork
from optimlab.population.compose import ShapeCachingLoader, task_part
from optimlab.population.schedule import why_not_followed
from optimlab.population.stacked import STACKED, build_member
from optimlab.population.stopping import unfollowed
from optimlab.record import holds_nothing_trained
from optimlab.resume import config_changes, override_keys, refuse_changed_config, sync_epochs
from optimlab.summary import FINISHED, SUMMARY, RunSummary, config_key, describe_run, dotted_value, read_summary
from optimlab.validate import (RULES, ConfigError, FolderInUse, check_range, check_shared_folders, outside_files,
                               rule_error, tracks_sharpness, validate_config, weight_dtype)

# a population trains in its weights' dtype, without mixed precision
POPULATION_PRECISIONS = ("32-true", "32", "64-true", "64")
# Keys in which the members of one population may differ (each member applies its own), and keys
# that do not change what a population computes (its reporting, or options it refuses anyway).
MEMBER_WISE = ("name", "lr", "seed", "resume", "regimes", "optimizer.lr", "optimizer.weight_decay", "data.seed",
               "data.label_noise", "model.init", "model.init_std", "trainer.progress_bar",
               "trainer.log_every_n_steps", "trainer.check_finite_every_n_steps", "optimized_metric",
               "callbacks.progress_bar",
               "callbacks.lr_monitor", "logger",  # each member's logs are its own (records.py)
               "callbacks.early_stopping")  # each member's own rule (stopping.py)
# What a population does itself, the way a single run's defaults do: its trainer keys, callbacks and logger.
POPULATION_TRAINER = ("_target_", "accelerator", "devices", "precision", "deterministic", "max_epochs",
                      "log_every_n_steps", "check_finite_every_n_steps", "progress_bar", "num_threads",
                      "flush_denormal", "compile", "limit_train_batches", "fast_dev_run", "enable_model_summary",
                      "gradient_clip_val", "gradient_clip_algorithm", "limit_val_batches", "limit_test_batches")
POPULATION_CALLBACKS = ("model_checkpoint", "progress_bar")
FOLLOWED_LOGGERS = (TensorBoardLogger, CSVLogger)  # whose files a member's record is replayed into (records.py)
TRAINER_DEFAULTS = {name: p.default for name, p in inspect.signature(L.Trainer).parameters.items()}
# Keys whose values only seed random generators (the run's seed_everything, the data split's
# generator) or set the optimizer's step size and weight decay: a job whose resolved config differs
# from one that passed its check only in them passes too where they pass their rules and its optimizer
# takes them (its constructor's checks), so a grid's seeds and learning rates are checked once (the
# narrow benchmark grid: 12 checks, not 360).
SHARED_CHECK_KEYS = ("seed", "data.seed", "lr", "optimizer.lr", "optimizer.weight_decay")


class PlanError(CompactHydraException):
    """A sweep the launcher cannot plan; Hydra prints its one line (a compact exception), not a traceback."""


@dataclass
class Job:
    """One job of the sweep: its composed config (with its ``hydra`` node, as ``run_job`` takes it)
    and where it runs; after :func:`classify`, how it runs."""

    num: int
    overrides: list[str]
    sweep_config: DictConfig
    run_dir: Path
    error: Exception | None = None   # an invalid config: the job fails alone with this
    alone: str | None = None         # why it runs through the task function (the single-run path)
    key: str | None = None           # jobs with equal keys can share a population
    task_config: DictConfig | None = field(default=None, repr=False)  # the task's config, when composed with it
    values: dict[str, Any] | None = field(default=None, repr=False)   # resolved_values(config), once resolved

    @functools.cached_property
    def config(self) -> DictConfig:
        """The task's config, without the ``hydra`` node (what the task function receives): the one
        composed with the job, else copied out of ``sweep_config`` once."""
        return self.task_config if self.task_config is not None else task_part(self.sweep_config)

    def resolved(self) -> dict[str, Any]:
        """The task config's values, interpolations resolved in the job's Hydra context (as its run
        resolves them for its record): :func:`classify`'s, else resolved here once."""
        if self.values is None:
            with hydra_config_of(self.sweep_config):
                self.values = OmegaConf.to_container(self.config, resolve=True)  # type: ignore[assignment]
        return self.values  # type: ignore[return-value]

    @functools.cached_property
    def plain(self) -> DictConfig:
        """:meth:`resolved` as a config, to read anywhere: a ``${hydra:...}`` interpolation resolves only in
        the job's Hydra context (a population's member's settings are read outside it)."""
        return OmegaConf.create(self.resolved())

    @functools.cached_property
    def memory(self) -> MemoryEstimate:
        """What a population of jobs like this one needs (:func:`estimate_memory`); computed once per
        group of jobs that can share a population (:func:`group` hands it to the others)."""
        return estimate_memory(self.plain)


def compose_jobs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[Job]:
    """Every job's config and output dir, as BasicLauncher and ``run_job`` make them."""
    loader = hydra_context.config_loader
    jobs, handed_out = [], set()
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        sweep_config = loader.load_sweep_config(config, list(overrides))
        if id(sweep_config) in handed_out:  # a job repeated in the batch: the loader kept one config for both
            sweep_config = copy.deepcopy(sweep_config)
        handed_out.add(id(sweep_config))
        # the task's config too, where the loader can make it faster than a copy out of sweep_config
        task = (loader.task_config(config, list(overrides), sweep_config)
                if isinstance(loader, ShapeCachingLoader) else None)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        with hydra_config_of(sweep_config):
            run_dir = Path(os.path.abspath(Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))) /
                                           str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))))
        # as run_job sets it when the job starts: ${hydra:runtime.output_dir} resolves
        set_output_dir(sweep_config, run_dir)
        jobs.append(Job(idx, list(overrides), sweep_config, run_dir, task_config=task))
    if isinstance(loader, ShapeCachingLoader):
        loader.forget_kept()
    return jobs


# ---- sorting the jobs ---------------------------------------------------------------------------

def check(cfg: DictConfig) -> None:
    """Raise the ConfigError or DataError :func:`optimlab.train.run` would raise before training:
    the config's rules, the constructors' checks (the parts built as ``run`` builds them) and the
    data (the files, the split's sizes, the test split)."""
    validate_config(cfg)
    with torch.random.fork_rng(devices=[]):  # building draws init weights: leave the caller's generator alone
        datamodule = build_parts(cfg).datamodule
    n = training_images(Path(datamodule.root), datamodule.download)
    items = training_items(n, datamodule.val_size, datamodule.subset, datamodule.label_noise, datamodule.seed)
    if isinstance(items, str):
        raise DataError(items)
    if (error := test_split_error(Path(datamodule.root))) is not None:
        raise DataError(error)
    test_items = len(load_split(Path(datamodule.root), train=False)[1])
    check_batch_limits(cfg.trainer, (items, datamodule.val_size, test_items), datamodule.batch_size,
                       datamodule.eval_batch_size)


def training_images(root: Path, download: bool) -> int:
    """How many training images the checked MNIST files under ``root`` hold (DataError if they are
    missing or broken); read once per root and sweep, not once per job (the files are 47 MB), and
    found missing once too (each job would try the download again: 0.15 s a job offline)."""
    found = checked_files(root, download)
    if isinstance(found, DataError):
        raise DataError(str(found))
    return found


@functools.lru_cache(maxsize=8)
def checked_files(root: Path, download: bool) -> int | DataError:
    """:func:`training_images`' answer, kept: the count, or the error."""
    try:
        ensure_files(root, download)
    except DataError as err:
        return err
    return len(load_split(root, train=True)[1])


@functools.lru_cache(maxsize=8)
def test_split_error(root: Path) -> str | None:
    """The DataError message the test split's files under ``root`` give (a run's data setup reads them
    before training), or None; read once per root and process, here, so that populations in forked
    processes share the loaded test set instead of each reading and converting it (55 MB a population;
    a dry run reads it too)."""
    try:
        load_split(root, train=False)
    except DataError as err:
        return str(err)
    return None


@functools.lru_cache(maxsize=64)
def training_items(n: int, val_size: int, subset: int | None, label_noise: float, seed: int) -> int | str:
    """How many training items the data split of ``n`` images leaves, or its DataError's message: kept,
    as a sweep's jobs repeat a few splits (the split draws a permutation of all ``n``: 2.7 ms a job)."""
    try:
        return len(split_indices(n, val_size, subset, label_noise, seed).train_labels)
    except DataError as err:
        return str(err)


def population_device(accelerator: str) -> torch.device | None:
    """The device Lightning's ``accelerator`` gives a single run, or None where a population cannot follow (MPS)."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps" or torch.backends.mps.is_available():
        return None
    return torch.device("cpu")


def logger_followed(entry: Mapping[str, Any]) -> bool:
    """Whether a population member's record can be replayed into the logger of this ``logger`` entry."""
    try:
        return issubclass(get_class(entry["_target_"]), FOLLOWED_LOGGERS)
    except Exception:  # not a class: the run's own build says what is wrong
        return False


def why_alone(cfg: DictConfig, elsewhere: bool = False) -> str | None:
    """Why the population loop cannot reproduce this (valid) job's run, or None when it can.
    ``elsewhere``: the populations train on machines the plan cannot see (SLURM), whose device it
    cannot tell from ``trainer.accelerator=auto``."""
    t, optimizer = cfg.trainer, cfg.optimizer
    unfollowed_settings = {"early_stopping": unfollowed, "lr_monitor": lr_monitor_unfollowed}
    callbacks = {name: entry for name, entry in (cfg.get("callbacks") or {}).items() if entry}
    extra_callbacks = set(callbacks) - set(unfollowed_settings) - set(POPULATION_CALLBACKS)
    callback_settings = [f"callbacks.{name}.{setting}" for name, entry in callbacks.items()
                         if name in unfollowed_settings for setting in unfollowed_settings[name](entry)]
    finite_every = t.get("check_finite_every_n_steps") or 1
    loggers = {name for name, entry in (cfg.get("logger") or {}).items() if entry and not logger_followed(entry)}
    trainer_args = {f"trainer.{key}={value}" for key, value in t.items()
                    if key not in POPULATION_TRAINER and value != TRAINER_DEFAULTS.get(key)}
    scheduler = why_not_followed(cfg) if cfg.get("scheduler") else None
    device = population_device(t.accelerator)
    # draws there come from the device's generator, which no member's CPU generator follows
    off_cpu = (device is not None and device.type != "cpu") or (elsewhere and t.accelerator != "cpu")
    reasons = {
        ", ".join(sorted(trainer_args)): bool(trainer_args),
        f"model {cfg.model.get('_target_')} cannot be stacked": cfg.model.get("_target_") not in STACKED,
        "model.dropout > 0 off the CPU": off_cpu and (cfg.model.get("dropout") or 0) > 0,
        "optimizer.impl=torch (member-wise groups are optimlab.optim's)": optimizer.get("impl") == "torch",
        "optimizer.grad_noise_std > 0 off the CPU": off_cpu and (optimizer.get("grad_noise_std") or 0) > 0,
        scheduler or "a learning-rate scheduler": scheduler is not None,
        "callbacks other than the defaults (" + ", ".join(sorted(extra_callbacks)) + ")": bool(extra_callbacks),
        f"callback settings a population does not follow ({', '.join(callback_settings)})": bool(callback_settings),
        # Its run applies the updates of up to n - 1 non-finite steps before it notices them, and records the
        # step of the check; a population checks every member at every step (null: 1 on the CPU, where the
        # records agree; on a GPU a run's 10 against the population's 1 is the one difference left, documented).
        f"trainer.check_finite_every_n_steps={finite_every} (a population checks every step)": finite_every > 1,
        "a logger other than TensorBoard or CSV (" + ", ".join(sorted(loggers)) + ")": bool(loggers),
        "trainer.max_epochs apart from epochs": t.get("max_epochs", cfg.epochs) != cfg.epochs,
        "test_ckpt=best with callbacks.model_checkpoint settings beyond one best checkpoint by val/loss or val/acc":
            cfg.test_ckpt == "best" and not best_followed((cfg.get("callbacks") or {}).get("model_checkpoint") or {}),
        f"trainer.precision={t.precision}": str(t.precision) not in POPULATION_PRECISIONS,
        "trainer.compile": bool(t.compile),
        "trainer.limit_train_batches=0": t.limit_train_batches == 0,
        "trainer.fast_dev_run": bool(t.fast_dev_run),
        "an MPS device": device is None,
        f"{Optimizer.__module__}.Optimizer subclasses only":  # optimizer.impl=torch is said above
            optimizer.get("impl") != "torch" and not issubclass(optimizer_class(optimizer)[0], Optimizer),
    }
    found = [reason for reason, applies in reasons.items() if applies]
    return ", ".join(found) or None


def population_key(cfg: DictConfig | Mapping[str, Any]) -> str:
    """The resolved config (or its values) without its :data:`MEMBER_WISE` keys: jobs with equal keys can
    share a population."""
    return config_key(cfg, MEMBER_WISE)


def resolved_values(cfg: DictConfig) -> dict[str, Any] | None:
    """``cfg``'s values, interpolations resolved, or None where one cannot be (the check says why)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:
        return None


def shared_keys_pass(values: dict[str, Any], cfg: DictConfig) -> bool:
    """Whether each of the :data:`SHARED_CHECK_KEYS` in ``values`` (``cfg`` resolved) holds a value its
    rule allows (those with a rule in :data:`~optimlab.validate.RULES`, and the weights' dtype holds
    the step size and weight decay: :func:`~optimlab.validate.check_range`), and ``cfg``'s optimizer is
    built with them (a stand-in parameter: the constructor's checks of its arguments)."""
    for key in SHARED_CHECK_KEYS:
        if key in RULES and rule_error(key, dotted_value(values, key)) is not None:
            return False
    try:
        check_range(cfg)
        cls, options = optimizer_class(cfg.optimizer)
        cls([torch.zeros(1, requires_grad=True)], **options)
    except Exception:  # the check says why, in the words a run uses
        return False
    return True


def finished_run_of(job: Job, saved: RunSummary) -> bool:
    """Whether ``saved``, a finished run's summary in ``job``'s folder, is of ``job``'s config (apart from what a
    resume may change); False where the config cannot be resolved to tell (its check names why)."""
    try:
        with hydra_config_of(job.sweep_config):
            return config_changes(saved.config, job.config, finished=True) is None
    except Exception:
        return False


def classify(job: Job, passed: set[str] | None = None, elsewhere: bool = False) -> None:
    """Decide how ``job`` runs: fails (``error``), alone (``alone``) or in a population (``key``).
    ``passed``: the keys (the config without :data:`SHARED_CHECK_KEYS`) of the jobs that passed their
    check so far, added to; a job with one of them whose values of those keys pass
    (:func:`shared_keys_pass`) passes without its own check. ``elsewhere``: as for :func:`why_alone`."""
    cfg = job.config
    resume = cfg.get("resume")
    if held_elsewhere(job.run_dir):  # a run another process started there, e.g. resume=<its folder>
        job.error = FolderInUse(f"{job.run_dir}: another process is running in this folder now; wait for it to "
                                "end, or stop it, then rerun with resume=auto")
        return
    # What the single-run path already decides (skip, resume, refuse to overwrite) stays its decision.
    if resume not in (None, "auto"):
        job.alone = f"resume={resume}"
    elif resume is None and holds_a_run(job.run_dir):
        job.alone = "its folder already holds a run"
    elif resume == "auto" and (saved := read_summary(job.run_dir)) is not None and saved.status in FINISHED:
        if finished_run_of(job, saved):
            job.alone = "complete (resume=auto skips it)"
        # else checked below, then refused as a finished run of another config, as its single run refuses it
    elif resume == "auto" and last_checkpoint(job.run_dir) is not None:
        job.alone = "resumes from its checkpoint"
    elif resume == "auto" and (job.run_dir / SUMMARY).exists() and read_summary(job.run_dir) is None:
        job.alone = f"its {SUMMARY} cannot be read"  # the single-run path refuses it
    if job.alone:
        return
    try:
        with hydra_config_of(job.sweep_config):
            keys = override_keys(job.overrides)
            if "trainer.max_epochs" in keys:  # it sets epochs too, as in its run (a copy: the job's own config is
                cfg = cfg.copy()              # what its .hydra/ record writes)
                sync_epochs(cfg, keys)
            values = job.values = resolved_values(cfg)
            shared = config_key(values, SHARED_CHECK_KEYS) if values is not None else None
            if passed is None or shared is None or shared not in passed or not shared_keys_pass(values or {}, cfg):
                check(cfg)
                if passed is not None and shared is not None:
                    passed.add(shared)
            if resume == "auto" and (saved := read_summary(job.run_dir)) is not None:
                refuse_changed_config(job.run_dir, saved, cfg)
            if holds_nothing_trained(job.run_dir):  # a new run (its own run continues its files there)
                check_shared_folders(cfg)
            job.alone = why_alone(cfg, elsewhere)
            if job.alone is None:
                job.key = population_key(values if values is not None else cfg)
    except (ConfigError, DataError) as err:
        job.error = err


def classify_all(jobs: Sequence[Job], processes: int = 1, elsewhere: bool = False) -> None:
    """:func:`classify` every job; with ``processes`` > 1 (where this platform can fork) the jobs are
    shared with ``processes - 1`` forked children (:class:`~optimlab.population.cluster.ForkedJob`),
    each process taking whole :func:`check_groups` (so that the jobs that can share a check meet in one
    process; the narrow benchmark grid's 360 jobs took 5 s of one core, 2026-12-05, AMD EPYC).
    The first job is classified here first, so the children inherit what it read once (the MNIST files'
    check). A child that fails leaves its share to this process, which then raises what it raised.
    ``elsewhere``: as for :func:`why_alone`."""
    if not jobs:
        return
    passed: set[str] = set()
    classify(jobs[0], passed, elsewhere)
    rest = list(jobs[1:])
    processes = min(processes, len(rest)) if can_fork() else 1
    here, *shares = shares_of(rest, processes)
    children = [(ForkedJob(verdicts_of, (share, elsewhere)), share) for share in shares if share]
    for job in here:
        classify(job, passed, elsewhere)
    for child, share in children:
        try:
            verdicts = child.result()
        except RuntimeError:  # the child ended without its verdicts
            verdicts = [None] * len(share)
        for job, verdict in zip(share, verdicts):
            if verdict is None:
                classify(job, passed, elsewhere)
            else:
                job.error, job.alone, job.key, job.values = verdict
    refuse_shared_folders(jobs)


# The key of a population put together again (rejoin_stopped_populations): group() keeps it whole.
REJOINED = "stopped population "


def rejoin_stopped_populations(jobs: Sequence[Job], dry_run: bool = False) -> None:
    """``resume=auto``: each population stopped after its training while its members were finished (a kill:
    some members complete, its checkpoint still there) is put together again, its complete members too, under
    a key of its own that :func:`group` keeps whole, so that it resumes from its checkpoint and finishes the
    rest. Without them the rest would form another population, which has no checkpoint and trains from the
    start, or, one job left, run alone, where a record of epochs without a checkpoint of its own cannot resume.
    A checkpoint left beside members that are all complete (a kill before its removal) is removed, but not by
    a dry run."""
    by_num = {job.num: job for job in jobs}
    summary_of = functools.cache(lambda num: read_summary(by_num[num].run_dir))  # each read once
    seen: set[tuple[int, ...]] = set()
    for job in jobs:
        summary = summary_of(job.num) if job.config.get("resume") == "auto" else None
        nums = tuple((summary.population or {}).get("jobs") or ()) if summary is not None else ()
        if not nums or nums in seen or not all(num in by_num for num in nums):
            continue
        seen.add(nums)
        members = [by_num[num] for num in nums]
        checkpoint = PopulationCheckpoint([member.run_dir for member in members], [])
        if not checkpoint.path.is_file():
            continue
        complete = [(saved := summary_of(num)) is not None and saved.status in FINISHED for num in nums]
        if all(complete):
            if not dry_run:
                checkpoint.remove()
        elif any(complete) and all(done or member.key is not None for member, done in zip(members, complete)):
            for member in members:
                member.alone, member.key = None, f"{REJOINED}{checkpoint.path.name}"


def refuse_shared_folders(jobs: Sequence[Job]) -> None:
    """Fail each job whose folder an earlier job of the sweep has too (a ``hydra.sweep.subdir`` that
    does not tell them apart), or that would write a file an earlier job writes outside its folder
    (:func:`~optimlab.validate.outside_files`): two members would write one record, the first's lost. The
    basic launcher's second job finds the first's files there and is refused alike."""
    first: dict[Path, Job] = {}
    for job in jobs:
        earlier = first.setdefault(Path(os.path.abspath(job.run_dir)), job)
        if earlier is not job:
            job.error = ConfigError(f"{job.run_dir} is also job #{earlier.num}'s folder; give each job its own "
                                    f"(hydra.sweep.subdir)")
            job.alone, job.key = None, None
            continue
        if job.error is not None or not holds_nothing_trained(job.run_dir):  # (one skipped or resumed: its own)
            continue
        with hydra_config_of(job.sweep_config):  # a save_dir may interpolate the job's Hydra config
            files = outside_files(job.config)
        for key, file, instead in files:
            earlier = first.setdefault(file, job)
            if earlier is not job:
                job.error = ConfigError(f"{key}: job #{earlier.num} writes {file} too, which one of them would "
                                        f"replace; give each job its own folder or {instead}")
                job.alone, job.key = None, None
                break


def check_groups(jobs: Sequence[Job]) -> list[list[Job]]:
    """``jobs`` grouped by their overrides other than those of :data:`SHARED_CHECK_KEYS` (in job order): the jobs
    that can share a check (:func:`classify`) are in one group (a guess from the overrides alone, which
    only decides where each job is classified, not its verdict)."""
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        key = tuple(o for o in job.overrides if o.split("=", 1)[0].lstrip("+~") not in SHARED_CHECK_KEYS)
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def shares_of(jobs: Sequence[Job], processes: int) -> list[list[Job]]:
    """``jobs`` split into ``processes`` shares of about as many jobs each, each in job order: whole
    :func:`check_groups` (each to the share with the fewest jobs so far), a group larger than a share cut
    in pieces (a sweep of learning rates alone is still classified by every process)."""
    processes = max(processes, 1)
    size = -(-len(jobs) // processes)
    shares: list[list[Job]] = [[] for _ in range(processes)]
    for members in check_groups(jobs):
        for start in range(0, len(members), size):
            min(shares, key=len).extend(members[start:start + size])
    return [sorted(share, key=lambda job: job.num) for share in shares]


def verdicts_of(jobs: Sequence[Job], elsewhere: bool = False
                ) -> list[tuple[Exception | None, str | None, str | None, dict[str, Any] | None]]:
    """A forked child's part of :func:`classify_all`: each job's verdict (error, alone, key) and, for a
    population's member, its resolved values (:meth:`Job.resolved`)."""
    passed: set[str] = set()
    for job in jobs:
        classify(job, passed, elsewhere)
    return [(job.error, job.alone, job.key, job.values if job.key else None) for job in jobs]


def data_order(cfg: Mapping[str, Any]) -> tuple[int, float]:
    """Where a job goes among its population's members (its config's values): by the data it sees
    (``data.seed``, ``data.label_noise``; the other data options are the population's)."""
    return int(cfg["data"]["seed"]), float(cfg["data"]["label_noise"])


def group(jobs: Sequence[Job], max_members: int,
          budget: Callable[[DictConfig], int | None] = lambda cfg: None) -> list[list[Job]]:
    """The populations: jobs with equal keys, ordered by their data (seed, label noise; else in job
    order), so that members which share their batches sit side by side (PopulationData gathers one
    batch per run of them), split evenly into parts of at most ``max_members`` and of at most as
    many as fit in ``budget(config)`` bytes (None: no bound) by :func:`estimate_memory`; a job left
    without a partner, or whose group cannot fit two members, runs alone. A population put together again
    (:func:`rejoin_stopped_populations`) stays whole, as it trained."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if job.key is not None:
            groups.setdefault(job.key, []).append(job)
    populations = []
    for key, members in groups.items():
        members.sort(key=lambda job: data_order(job.resolved()))
        if key.startswith(REJOINED):  # as it trained (its checkpoint holds all of them), whatever max_members now
            populations.append(members)
            continue
        limit, room = max_members, budget(members[0].plain)
        if room is not None:
            need = members[0].memory
            for job in members:
                job.memory = need  # the same model and data: one estimate serves the group's plan lines too
            fits = need.members_within(room)
            if fits < 2 <= max_members:
                why = (f"two members would need ~{need.total(2) / 2**20:,.0f} MiB, more than a population's memory "
                       f"budget ({room / 2**20:,.0f} MiB)")
                if fits == 0:
                    why += "; even one may not fit"
                for job in members:
                    job.alone, job.key = why, None
                continue
            limit = min(limit, fits)
        if limit < 2:  # population.max_members=1: no population at all
            for job in members:
                job.alone, job.key = f"population.max_members={max_members}", None
            continue
        parts = math.ceil(len(members) / limit)
        size = math.ceil(len(members) / parts)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            if len(chunk) == 1:
                chunk[0].alone, chunk[0].key = "a population of one", None
            else:
                populations.append(chunk)
    return populations


# ---- memory and the plan -----------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    """Rough bytes a population needs on its device: ``shared`` whatever its size, ``per_member`` for each member."""

    shared: int
    per_member: int

    def total(self, members: int) -> int:
        return self.shared + members * self.per_member

    def members_within(self, budget: int) -> int:
        """How many members fit in ``budget`` bytes (0 when not even one does)."""
        return max(0, (budget - self.shared) // self.per_member)


def tensor_elements(obj: Any, skip: set[int]) -> int:
    """Elements of the tensors (not scalars) reachable from ``obj`` through dicts, lists and tuples
    (dict values only), each counted once; tensors whose ``id`` is in ``skip`` are left out."""
    if isinstance(obj, Tensor):
        if id(obj) in skip or not obj.dim():
            return 0
        skip.add(id(obj))
        return obj.numel()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_elements(item, skip) for item in items)


def estimate_memory(cfg: DictConfig) -> MemoryEstimate:
    """What a population of copies of ``cfg``'s run needs on its device, roughly. Shared: MNIST
    (float32). Per member: its weights, gradients, last finite weights and one parameter-sized
    temporary of the update (on a GPU one more: the weights a member is updated into when they
    overflow, kept by a torch.where each step; with ``test_ckpt=best`` one more: its best epoch's
    weights; with gradient noise one more: its draws); every tensor its optimizer holds after two
    steps (state and reused buffers, counted on the single model); the larger of a training step's activations (kept for
    the backward pass, with their gradients) and an evaluation chunk's; its index tensors; with
    sharpness tracking, its Lanczos basis with the temporaries of a product and its probe's activations
    through a double backward."""
    size = weight_dtype(cfg.trainer.precision).itemsize
    model = build_member(cfg.model, cfg.seed).eval()  # eval: the forward below draws no dropout masks
    cls, options = optimizer_class(cfg.optimizer)
    noise = options.pop("grad_noise_std", 0.0)  # drawn by the loop into buffers of its own (below), not here
    for key in ("lr", "weight_decay"):  # what the state holds does not depend on them: values no update overflows
        if options.get(key):
            options[key] = 1e-3
    optimizer = cls(model.parameters(), **options)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(2):  # the first step creates the state; buffers may be made on either
        optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    held = tensor_elements(vars(optimizer), {id(t) for p in model.parameters() for t in (p, p.grad)})
    activations = 0

    def count(module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
        nonlocal activations
        activations += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    image = 28 * 28 * (4 + size)  # the gathered float32 image and its cast copy
    step = cfg.data.batch_size * (2 * activations * size + image)
    evaluation = cfg.data.eval_batch_size * (activations * size + image)
    n = training_images(Path(resolve_root(cfg.data.root)), bool(cfg.data.download))
    indices = 3 * n * 8  # a member's index tensors are at most this long
    tracking = 0
    if tracks_sharpness(cfg):  # its Lanczos basis, and its probe with a double backward
        curvature = cfg.curvature
        # 16 parameter-sized vectors more than the basis: the gradient with its graph, the product and the
        # reorthogonalisation's temporaries (measured against peak resident memory, docs/population.md).
        rows = measurement_iters(curvature.iters, warm=False)  # a cold measurement's basis
        probe = min(curvature.probe_size, cfg.data.subset or n - cfg.data.val_size)  # at most the training set
        tracking = (rows + 16) * params * size + probe * (28 * 28 * 4 + 4 * activations * size)
    copies = 5 if population_device(cfg.trainer.accelerator) == torch.device("cuda") else 4
    copies += (cfg.test_ckpt == "best") + (noise > 0)  # its best checkpoint's weights; its gradient noise
    return MemoryEstimate(shared=(n + 10_000) * 28 * 28 * 4,
                          per_member=(copies * params + held) * size + max(step, evaluation) + indices + tracking)


MEMORY_SHARE = 0.7  # of a device's memory one population plans on: the estimate is rough


# Where Linux puts a container's (cgroup v2, v1) memory limit, which the machine's total does not show.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory ``device`` has: the GPU's, or the machine's (at most its container's limit);
    None where that is unknown. The total, not what is free now: a rerun with ``resume=auto`` must
    regroup its jobs as the first run did to find their populations' checkpoints."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (RuntimeError, AssertionError, ValueError, OSError, AttributeError):  # no GPU here; no sysconf (Windows)
        return None
    for limit in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            total = min(total, int(text))
    return total


class MemoryBudget:
    """The bytes one population may use on its device, as :func:`group` asks for a job's config:
    ``max_memory_gib`` when given; else :data:`MEMORY_SHARE` of the device's memory, shared by the
    ``jobs_at_once`` populations that train on this machine together; else (``jobs_at_once`` None,
    or the memory unknown) no bound, for the reason ``unbounded``. Each device's figure is read once
    and kept, with where it came from, for the plan."""

    def __init__(self, max_memory_gib: float | None, jobs_at_once: int | None, unbounded: str = "") -> None:
        self.max_memory_gib, self.jobs_at_once, self.unbounded = max_memory_gib, jobs_at_once, unbounded
        self.found: dict[str, tuple[int | None, str]] = {}

    def __call__(self, cfg: DictConfig) -> int | None:
        device = population_device(cfg.trainer.accelerator) or torch.device("cpu")
        if device.type not in self.found:
            self.found[device.type] = self.measure(device)
        return self.found[device.type][0]

    def measure(self, device: torch.device) -> tuple[int | None, str]:
        """(the budget on ``device``, or None; where it comes from)."""
        if self.max_memory_gib is not None:
            return int(self.max_memory_gib * 2**30), "population.max_memory_gib"
        if self.jobs_at_once is None:
            return None, f"not bounded: {self.unbounded}"
        total = device_memory(device)
        if total is None:
            return None, f"not bounded: the {device.type}'s memory is unknown (set population.max_memory_gib)"
        together = f", shared by {self.jobs_at_once} jobs at once" if self.jobs_at_once > 1 else ""
        return (int(MEMORY_SHARE * total / self.jobs_at_once),
                f"{MEMORY_SHARE:.0%} of the {device.type}'s {total / 2**30:,.1f} GiB{together}")

    def plan_lines(self) -> list[str]:
        """One line per device that was asked about."""
        return [f"  memory per population on {device}: " + (f"at most ~{room / 2**20:,.0f} MiB ({why})"
                                                              if room is not None else why)
                for device, (room, why) in self.found.items()]


def machine_memory_share() -> int | None:
    """:data:`MEMORY_SHARE` of this machine's memory (within its container's limit), or None where it
    is unknown: what populations training side by side in forked processes may use together."""
    total = device_memory(torch.device("cpu"))
    return None if total is None else int(MEMORY_SHARE * total)


def population_memory(members: Sequence[Job]) -> int:
    """A population's estimated memory in bytes (:func:`estimate_memory`)."""
    return members[0].memory.total(len(members))


def fits_beside(running: Sequence[Sequence[Job]], members: Sequence[Job], room: int | None) -> bool:
    """Whether a population of ``members`` fits in ``room`` bytes (None: no bound) beside the
    ``running`` ones, by their estimates."""
    return room is None or sum(map(population_memory, running)) + population_memory(members) <= room


def memory_budget(max_memory_gib: float | None, executor: Executor | None, max_parallel: int | None) -> MemoryBudget:
    """The budget for populations trained in this process (one at a time), in forked processes or as
    submitit_local jobs (on this machine, ``max_parallel`` at once) or as SLURM jobs (on machines the
    plan cannot see)."""
    if executor is None or executor.cluster == "processes":  # forked: grouped as here; how many at once: fits_beside
        return MemoryBudget(max_memory_gib, 1)
    if executor.cluster == "slurm":
        return MemoryBudget(max_memory_gib, None, "the populations train on other machines "
                                                  "(set population.max_memory_gib)")
    return MemoryBudget(max_memory_gib, max_parallel, "submitit_local trains every population at once "
                                                      "(set hydra.launcher.max_parallel or population.max_memory_gib)")


# Member-wise values a plan line names where its members differ in them (besides lr and seed)
DESCRIBED = ("optimizer.weight_decay", "data.seed", "data.label_noise", "model.init", "model.init_std")


def describe_population(members: Sequence[Job]) -> str:
    """One line: the shared architecture and training, the members' learning rates and seeds, and any other
    of :data:`DESCRIBED` in which they differ (a data seed only where it is not the seed) (not the memory)."""
    cfg = members[0].plain
    run = describe_run(members[0].resolved())
    lrs = sorted({float(job.resolved()["optimizer"]["lr"]) for job in members})
    seeds = sorted({int(job.resolved()["seed"]) for job in members})
    differ = ""
    for key in DESCRIBED:
        section, name = key.split(".")
        values = [job.resolved()[section].get(name) for job in members]
        follows_seed = key == "data.seed" and all(v == job.resolved()["seed"] for v, job in zip(values, members))
        if len(set(map(str, values))) > 1 and not follows_seed:  # in the members' order (of their jobs)
            differ += f"; {key} {', '.join(dict.fromkeys(map(str, values)))}"
    device = population_device(cfg.trainer.accelerator)
    schedule = f" ({str(cfg.scheduler._target_).rsplit('.', 1)[-1]})" if cfg.get("scheduler") else ""
    epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    return (f"{run.model} {run.widths or '-'}, {run.optimizer}{schedule}, {epochs} of batch {cfg.data.batch_size}, "
            f"{str(weight_dtype(cfg.trainer.precision)).removeprefix('torch.')} on {device}; "
            f"lr {', '.join(f'{lr:g}' for lr in lrs)}; seed {', '.join(map(str, seeds))}{differ}")


def shared_overrides(members: Sequence[Job]) -> list[str]:
    """The command-line overrides every member of a population has, less the member-wise ones."""
    common = [o for o in members[0].overrides if all(o in job.overrides for job in members[1:])]
    return [o for o, key in zip(common, override_keys(common)) if key not in MEMBER_WISE]


def plan_text(jobs: Sequence[Job], populations: Sequence[Sequence[Job]], budget: MemoryBudget) -> str:
    """The launch plan, as printed before training."""
    pooled = sum(len(p) for p in populations)
    alone = [job for job in jobs if job.alone]
    failed = [job for job in jobs if job.error]
    lines = [f"population launcher: {len(jobs)} jobs -> {pooled} in {len(populations)} population(s), "
             f"{len(alone)} alone, {len(failed)} invalid", *budget.plan_lines()]
    texts = [describe_population(members) for members in populations]
    for i, (members, text) in enumerate(zip(populations, texts, strict=True), 1):
        nums = ", ".join(f"#{job.num}" for job in members)
        twins = [p for p, t in zip(populations, texts) if t == text]
        if len(twins) > 1:  # what tells them apart: their jobs' own settings (none where one was split)
            own = [shared_overrides(p) for p in twins]
            text += "".join(f"; {o}" for o in own[twins.index(members)] if not all(o in other for other in own))
        lines.append(f"  population {i}: {len(members)} members (jobs {nums}): {text}; "
                     f"~{population_memory(members) / 2**20:,.0f} MiB")
    lines += grouped_lines(alone, "alone", lambda job: job.alone)
    lines += grouped_lines(failed, "invalid", lambda job: job.error)
    return "\n".join(lines)


def grouped_lines(jobs: Sequence[Job], what: str, reason: Callable[[Job], object]) -> list[str]:
    """A plan line per distinct ``reason`` of ``jobs`` (in words), naming its jobs: a sweep whose every job failed
    for one reason (its MNIST files missing) had said it once per job."""
    by_reason: dict[str, list[Job]] = {}
    for job in jobs:
        by_reason.setdefault(str(reason(job)), []).append(job)
    return [f"  job{'s' if len(same) > 1 else ''} {', '.join(f'#{job.num}' for job in same)} {what}: {text}"
            for text, same in by_reason.items()]


def check_plan_is_the_sweeps(config: DictConfig, jobs: Sequence[Job]) -> None:
    """``population.*`` is read once, from the sweep's config, to plan every job: a value swept per
    job (``population.max_members=8,16``) would be ignored, so it is refused (:class:`PlanError`)."""
    plan = OmegaConf.select(config, "population")
    for job in jobs:
        theirs = OmegaConf.select(job.sweep_config, "population")
        if theirs != plan:
            given = [o for o in job.overrides if o.lstrip("+~").startswith("population.")]
            raise PlanError(f"{', '.join(given) or 'population'}: the population launcher's plan is one for the whole "
                            f"sweep (job #{job.num} would differ); give population.* a single value, not a sweep")
