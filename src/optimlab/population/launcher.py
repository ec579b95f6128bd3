"""The population launcher's work: a Hydra sweep's jobs grouped into populations and trained together.

``python train.py -m hydra/launcher=population <sweep>`` (plugin:
``hydra_plugins.optimlab_population``) calls :func:`launch`, which

1. plans the sweep (:mod:`optimlab.population.plan`): every job's config composed as Hydra's
   BasicLauncher composes it; a job whose config is invalid fails alone (its one-line
   ConfigError/DataError message recorded in a ``crashed`` summary.json); one that a population
   cannot reproduce, or whose folder already holds a run, runs through the sweep's task function
   (``train.py``'s ``main``, hence :func:`optimlab.train.run`) as in a sequential sweep; the others
   are grouped into populations; the plan is printed, and with ``dry_run`` that is all;
2. trains each population (:mod:`optimlab.population`) in this process, or as a submitit job
   (``hydra.launcher.executor``, :mod:`optimlab.population.cluster`), writing every member's ``running``
   summary after each epoch;
3. finishes each member as a Hydra job (``.hydra/`` files, job logging, callbacks, a JobReturn:
   :func:`~optimlab.hydra_job.run_composed_job`, ``run_job``'s steps without its copies of the config)
   whose task writes its final summary and TensorBoard events.

JobReturns come back in job order, as BasicLauncher's do, so a failed job makes ``-m`` exit non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from optimlab.build import optimizer_class, set_torch_options
from optimlab.console import say
from optimlab.files import held, remove_stale_temporaries
from optimlab.hydra_job import (JobFailed, hydra_config_of, recorded_overrides, remove_dry_sweep_folder,
                                run_composed_job, save_job_record)
from optimlab.optim import Optimizer
from optimlab.population.best import MemberBest
from optimlab.population.checkpoint import CHECKPOINTS, PopulationCheckpoint
from optimlab.population.cluster import Executor, run_as_jobs, usable_cpus
from optimlab.population.curvature import MemberSharpness
from optimlab.population.data import PopulationData
from optimlab.population.loop import MemberRecord, PopulationLoop, member_optimizer
from optimlab.population.plan import (Job, PlanError, check_plan_is_the_sweeps, classify_all, compose_jobs,
                                      fits_beside, group, machine_memory_share, memory_budget, plan_text,
                                      population_device, rejoin_stopped_populations)
from optimlab.population.records import PopulationRun, member_summary, write_logs, write_member
from optimlab.population.schedule import MemberSchedules
from optimlab.population.stacked import STACKED, StackedModel
from optimlab.population.stopping import MemberEarlyStopping
from optimlab.record import device_name, log_epoch_lines, record_refusal, refused_summary, result_line, synchronize
from optimlab.summary import FINISHED, RunSummary, config_key, read_summary, returned_value, write_summary
from optimlab.resume import MAY_DIFFER_ON_RESUME, override_keys, sync_epochs
from optimlab.search import searching
from optimlab.signals import EXIT_CODES, StopOnSignal, exit_code, signals_deferred
from optimlab.validate import ConfigError, FolderInUse, tracks_sharpness, weight_dtype

log = logging.getLogger(__name__)


class PopulationCrashed(JobFailed):
    """The population a job trained in stopped with an error (logged with its traceback when it
    stopped); every member's job fails with it."""


# ---- training a population ----------------------------------------------------------------------

class ReportingLoop(PopulationLoop):
    """The population loop, reporting each finished epoch to ``on_epoch(epochs_done)`` (which saves the
    checkpoint and writes the members' summaries) and timing the population's first step (the warm-up
    a run's throughput leaves out)."""

    def __init__(self, *args: Any, on_epoch: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_epoch = on_epoch
        self.first_step_s: float | None = None

    def step(self, x: Tensor, y: Tensor, last: bool = False) -> Tensor:
        if self.global_step:
            return super().step(x, y, last)
        synchronize(x.device)
        started = time.perf_counter()
        losses = super().step(x, y, last)
        synchronize(x.device)
        self.first_step_s = time.perf_counter() - started
        return losses

    def end_epoch(self, epochs_done: int) -> None:
        self.on_epoch(epochs_done)


def set_deterministic(deterministic: bool) -> None:
    """``trainer.deterministic`` as Lightning applies it to a run: torch's deterministic algorithms,
    and on a GPU the cuBLAS workspace setting they need."""
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Ask the C library's malloc (glibc) to keep freed memory for reuse: no fresh mapping per large
    block (``M_MMAP_MAX`` 0) and no handing the heap's top back to the system (``M_TRIM_THRESHOLD``
    2 GiB). A CPU population's large per-step tensors (the first layer's weight gradient of 30
    width-512 members is 48 MB) are otherwise mapped afresh and page-faulted in every step: a
    width-512 SGD population's step took 64-66 ms with glibc's defaults and 47 ms with these (one
    thread, AMD EPYC); single runs, whose tensors are smaller, gain nothing (measured). Process-wide;
    False where the C library has no ``mallopt`` (not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def population_optimizer(model: StackedModel, optimizers: Sequence[Mapping[str, Any]]) -> tuple[Optimizer, float]:
    """The members' optimizer (:func:`member_optimizer`) from their resolved optimizer configs, which share
    their class and options and differ in ``lr`` and ``weight_decay``; and the shared ``grad_noise_std``,
    which the loop draws per member."""
    cls, options = optimizer_class(OmegaConf.create(optimizers[0]))
    for key in ("lr", "weight_decay"):
        options.pop(key, None)
    grad_noise_std = float(options.pop("grad_noise_std", 0.0))
    optimizer = member_optimizer(cls, model, [float(o["lr"]) for o in optimizers],
                                 [float(o.get("weight_decay") or 0.0) for o in optimizers], **options)
    return optimizer, grad_noise_std


def train_members(members: Sequence[Job], name: str) -> list[RunSummary]:
    """Train ``members`` as one population; each member's final summary (``complete`` or
    ``diverged``, tested on the test set with its last weights, or its best epoch's under ``test_ckpt=best``),
    or, if the population stops with an error, each member's ``crashed`` summary with that error. After each
    epoch the population's checkpoint (:class:`~optimlab.population.checkpoint.PopulationCheckpoint`) is saved,
    then each member's ``running`` summary written; under ``resume=auto`` a population whose checkpoint
    exists continues from it. Interrupted (SIGINT, SIGTERM): the members' summaries say ``interrupted`` and
    the process exits 130 or 143, as a single run does."""
    started = time.perf_counter()
    # Read from the members' resolved values: a ${hydra:...} interpolation resolves only in its job's context.
    resolved = [job.resolved() for job in members]
    first = members[0].plain
    records = [MemberRecord() for _ in members]
    noisy = [0] * len(members)
    checkpoint = PopulationCheckpoint([job.run_dir for job in members], resolved)
    for job in members:  # what a kill mid-write left in a member's folder (a single run's _claim does the same)
        remove_stale_temporaries(job.run_dir)
    previous = [len(summary.epochs) if (summary := read_summary(job.run_dir)) else 0 for job in members]
    population = PopulationRun(name, [job.num for job in members], device="?", dtype="?", steps_per_epoch=0,
                               train_size=0, params=0, checkpoint=str(checkpoint.path))
    earlier_wall_s = 0.0  # a resumed population's wall time before its interruption

    def wall_time() -> float:
        return earlier_wall_s + time.perf_counter() - started

    def summaries(status: str | None, **final: Any) -> list[RunSummary]:
        """Every member's summary with ``status`` (None: complete or diverged, as it ended)."""
        population.wall_time_s = wall_time()
        return [member_summary(status or ("diverged" if r.diverged else "complete"), config, r, population, m,
                               noisy[m], **final) for m, (config, r) in enumerate(zip(resolved, records))]

    def keeps_old(m: int) -> bool:
        """Whether member ``m``'s folder holds more epochs than its record (not yet restored from the
        checkpoint, or a population starting over): its summary stays until the record catches up."""
        return len(records[m].history) < previous[m]

    def write_all(status: str) -> None:
        written = [(job, summary) for m, (job, summary) in enumerate(zip(members, summaries(status)))
                   if not keeps_old(m)]
        for job, summary in written:
            job.run_dir.mkdir(parents=True, exist_ok=True)
            write_summary(job.run_dir, summary)
        if status == "interrupted":  # then what else a stopped run's folder holds: its job record, its logs so far
            # Each apart: the summary is whole, and a resumed member writes the rest; the stop goes on.
            for job, summary in written:
                try:
                    save_member_job_record(job)
                except Exception:
                    log.exception(f"{job.run_dir}: its job record was not written")
                try:
                    if summary.epochs:
                        write_logs(job.run_dir, summary)
                except Exception:
                    log.exception(f"{job.run_dir}: its logs of the epochs so far were not written")

    def on_epoch(done: int) -> None:
        population.first_step_s = loop.first_step_s
        checkpoint.save(loop.state_dict(), first_step_s=loop.first_step_s, wall_time_s=wall_time())
        write_all("running")
        # Printed once saved: a Ctrl-C answering the line finds the epoch kept.
        rows = [r.history[-1] for r in records if r.history and r.history[-1]["epoch"] == done]
        val = [row["val_acc"] for row in rows if math.isfinite(row.get("val_acc", math.nan))]
        training = int(loop.alive.sum())  # neither diverged nor stopped early
        say(f"{name}: epoch {done:>3}/{first.epochs} | {training}/{len(records)} members training | val acc "
            f"{min(val, default=math.nan):.4f}-{max(val, default=math.nan):.4f} | "
            f"{rows[0]['train_time_s'] if rows else 0.0:.1f}s")

    # SIGINT/SIGTERM raise KeyboardInterrupt; inside the fit, Lightning's graceful shutdown ends in SystemExit.
    stopper = StopOnSignal()
    try:
        with stopper.handling():
            set_torch_options(first.trainer)
            set_deterministic(first.trainer.deterministic)
            device = population_device(first.trainer.accelerator)
            if device.type == "cpu":
                keep_freed_memory()
            dtype = weight_dtype(first.trainer.precision)
            seeds = [int(r["seed"]) for r in resolved]
            model = STACKED[first.model._target_].from_configs([r["model"] for r in resolved], seeds)
            model = model.to(device=device, dtype=dtype)
            # one data module per distinct data config (only its settings are read)
            data_keys = [config_key(r["data"], ()) for r in resolved]
            built = {key: instantiate(r["data"]) for key, r in dict(zip(data_keys, resolved)).items()}
            data = PopulationData([built[key] for key in data_keys], device, first.trainer.limit_train_batches,
                                  first.trainer.limit_val_batches, first.trainer.limit_test_batches)
            optimizer, grad_noise_std = population_optimizer(model, [r["optimizer"] for r in resolved])
            population.device, population.dtype = device_name(device), str(dtype).removeprefix("torch.")
            population.steps_per_epoch, population.train_size = data.steps_per_epoch, data.train_size
            population.params = sum(p[0].numel() for p in model.parameters())
            noisy[:] = data.noisy_counts
            tracking = first.get("curvature")
            sharpness = MemberSharpness(tracking.every_n_steps, seeds, tracking.probe_size,
                                        tracking.iters, tracking.tol, tracking.log_spaced_start) \
                if tracks_sharpness(first) else None
            schedules = MemberSchedules([job.plain for job in members]) if first.get("scheduler") else None
            clip = first.trainer.gradient_clip_val
            stopping = MemberEarlyStopping.from_entries(
                [(r.get("callbacks") or {}).get("early_stopping") for r in resolved], dtype)
            best = MemberBest.from_entry(first.callbacks.model_checkpoint, len(members)) \
                if first.test_ckpt == "best" else None
            log_every = [r["trainer"]["log_every_n_steps"] for r in resolved]
            clipping = (float(clip), first.trainer.gradient_clip_algorithm or "norm") if clip else None
            loop = ReportingLoop(model, optimizer, data, log_every, sharpness, schedules, clipping, stopping,
                                 grad_noise_std, best, on_epoch=on_epoch)
            records = loop.records
            if all(r.get("resume") == "auto" for r in resolved):
                saved, why_not = checkpoint.load(device)
                if saved is None:
                    say(f"{name}: starting from scratch ({why_not})")
                else:
                    loop.load_state_dict(saved["loop"])
                    loop.first_step_s, earlier_wall_s = saved["first_step_s"], saved["wall_time_s"]
                    population.first_step_s = loop.first_step_s
                    say(f"{name}: resumed from {checkpoint.path} after epoch {loop.epochs_done}")
            write_all("running")
            loop.fit(first.epochs, test_every_epoch=first.data.test_every_epoch, callbacks=[stopper])
            if stopper.requested:  # held while the last epoch was recorded: the fit ended without raising it
                raise KeyboardInterrupt(stopper.requested)
            # As a run's test: its best checkpoint's weights where it has one, else its last.
            best_weights = best.weights if best is not None else {}
            test_loss, test_acc, _ = loop.evaluate(data.test_batches(), shared=True, instead=best_weights).tolist()
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Lightning's exit after its graceful shutdown
        signal_name = stopper.requested or "SIGINT"
        with signals_deferred():  # a second stop (a launcher passing the first on) must not cut the records short
            write_all("interrupted")
        where = "from its checkpoint" if checkpoint.path.is_file() else "from the start (no epoch had finished)"
        say(f"{name} interrupted ({signal_name}); its members' folders hold their records and logs so far; "
            f"rerun the sweep with resume=auto to continue {where}", sys.stderr)
        sys.exit(EXIT_CODES[signal_name])
    except Exception as err:  # the whole population stops: every member's job fails with the error
        log.exception(f"{name} crashed")
        error = f"{type(err).__name__}: {err}"
        return [crashed_record(job, name, error) if keeps_old(m) else summary
                for m, (job, summary) in enumerate(zip(members, summaries("crashed", error=error)))]
    population.checkpoint = None  # removed once every member has finished (launch)
    final = summaries(None)
    for m, (summary, loss, acc) in enumerate(zip(final, test_loss, test_acc)):
        summary.test_loss, summary.test_acc = loss, acc
        summary.tested_checkpoint = "best" if m in best_weights else "last"
    return final


# ---- the jobs -----------------------------------------------------------------------------------

def forkable(members: Sequence[Job]) -> bool:
    """Whether a population can train in a forked child: on the CPU, with one torch thread (or torch's
    default, which a child sets to one; see :mod:`optimlab.population.cluster`)."""
    trainer = members[0].plain.trainer
    return population_device(trainer.accelerator).type == "cpu" and (trainer.num_threads or 1) == 1


def work(members: Sequence[Job]) -> int:
    """A population's work, roughly: members x the memory a member needs x epochs."""
    return len(members) * members[0].memory.per_member * int(members[0].plain.epochs)


def stopped_line(signal_name: str, name: str) -> str:
    """What the sweep says when a stop held while ``name``'s members were finished ends it."""
    return (f"stopped ({signal_name}) once {name}'s members were finished; "
            "rerun the sweep with resume=auto to run the rest")


def describe_members(members: Sequence[Job]) -> str:
    """``30 members (jobs #0, #3, ...)``."""
    return f"{len(members)} members (jobs {', '.join(f'#{job.num}' for job in members)})"


def save_member_job_record(job: Job) -> None:
    """A member's ``.hydra/`` record, as its single run writes it (with its run's epochs): not where its folder
    holds the record of the command that started its run (a stopped member's), which a continued run keeps."""
    if recorded_by_its_start(job):
        return
    with hydra_config_of(job.sweep_config):  # its hydra.runtime.output_dir set when it was composed
        sync_epochs(job.config, override_keys(job.overrides))  # as its run records them
        save_job_record(job.run_dir, job.config)


def recorded_by_its_start(job: Job) -> bool:
    """Whether ``job``'s folder holds Hydra's record of a job with its overrides but for the keys a resume may
    change (``resume=auto`` among them): the command that started the run it continues."""
    def kept(overrides: list[str]) -> list[str]:
        return [o for o, key in zip(overrides, override_keys(overrides))
                if not any(key == k or key.startswith(f"{k}.") for k in MAY_DIFFER_ON_RESUME)]

    recorded = recorded_overrides(job.run_dir)  # None: a new run, or one killed before its record
    return recorded is not None and kept(recorded) == kept(list(job.overrides))


def record_member(job: Job, summary: RunSummary) -> None:
    """The files a member's Hydra job writes: its ``.hydra/`` record and its summary and TensorBoard
    events (:func:`~optimlab.population.records.write_member`)."""
    save_member_job_record(job)
    write_member(job.run_dir, summary)


def train_and_record(members: Sequence[Job], name: str) -> tuple[list[RunSummary], str | None]:
    """:func:`train_members`, then each member's files written (:func:`record_member`): a forked
    process's work, so that the launcher, which finishes every member's Hydra job, need not write
    them. A stop signal while they are written is held until the last (else trained members would
    lose their test results) and returned with the summaries: the launcher stops the sweep once it
    has finished them."""
    results = train_members(members, name)
    with signals_deferred() as received:
        results = record_members(members, results)
    return results, (received[0] if received else None)


def record_members(members: Sequence[Job], results: list[RunSummary]) -> list[RunSummary]:
    """Each member's files written (:func:`record_member`); ``results``, with a crashed summary for a member
    whose files could not be written (its summary says so): its job fails, the others are written."""
    recorded = []
    for job, summary in zip(members, results):
        try:
            record_member(job, summary)
        except Exception as err:
            summary = replace(summary, status="crashed", error=f"{type(err).__name__}: {err}")
            with contextlib.suppress(OSError):  # also where its .hydra/ record failed, before its summary
                write_summary(job.run_dir, summary)
        recorded.append(summary)
    return recorded


def failed_and_recorded(members: Sequence[Job], name: str, error: str) -> tuple[list[RunSummary], None]:
    """:func:`failed_members`, each member's files written (:func:`record_members`), as
    :func:`train_and_record` would have."""
    return record_members(members, failed_members(members, name, error)), None


def finish_member(job: Job, summary: RunSummary, recorded: bool = False) -> TaskFunction:
    """The task of a member's Hydra job: its files written (:func:`record_member`; ``recorded``: they
    were, where it trained), its epoch lines and result logged (the job's ``train.log`` and the
    console); returns its ``optimized_metric`` as ``train.py``'s task does, or fails with the
    population's error (crashed, or interrupted as a job elsewhere)."""
    def task(cfg: DictConfig) -> float | None:
        if recorded:
            sync_epochs(cfg, override_keys(job.overrides))
        else:
            record_member(job, summary)
        log_epoch_lines(summary, int(cfg.epochs))  # the job's train.log holds what its run's would
        error = f"{summary.population['name']} {summary.status}: {summary.error}"
        if summary.status == "interrupted" or (summary.status == "crashed" and not searching()):
            raise PopulationCrashed(error)
        if summary.status == "crashed":  # as train.py's task: a search goes on
            say(f"error: the trial crashed ({error}); it scores the worst value", sys.stderr)
        else:
            log.info(result_line(summary))
        return returned_value(summary, cfg)

    return task


def crashed_record(job: Job, name: str, error: str, stopped: bool = False) -> RunSummary:
    """What ``job``'s folder holds (its epochs so far), ``crashed`` with ``error``, or ``interrupted``
    where it says so and ``stopped`` (a cancelled submitit job wrote it); or a bare crashed summary
    where it holds nothing; as a member of ``name``. A finished member's record (written before its
    population's job failed) stays as it is."""
    with hydra_config_of(job.sweep_config):  # its values resolved as its run resolves them
        summary = read_summary(job.run_dir) or refused_summary(job.config, error)
    if summary.status in FINISHED:
        return summary
    if not (stopped and summary.status == "interrupted"):
        summary.status = "crashed"
    summary.error = error
    summary.population = {**(summary.population or {}), "name": name}
    return summary


def failed_members(members: Sequence[Job], name: str, error: str) -> list[RunSummary]:
    """The summaries of a population whose submitit job failed (:func:`crashed_record` of each member)."""
    return [crashed_record(job, name, error, stopped=True) for job in members]


def fail_job(job: Job) -> TaskFunction:
    """The task of an invalid job: a ``crashed`` summary with the one-line error (unless its folder
    holds a run already: that stays as it is), which it then prints and raises as train.py's task does
    (:class:`~optimlab.hydra_job.JobFailed`, so Hydra marks the job failed and ends the sweep with the line)."""
    def task(cfg: DictConfig) -> float | None:
        assert job.error is not None
        say(f"error: {job.error}", sys.stderr)
        with contextlib.suppress(ConfigError):  # the config recorded as the run's would be: epochs given once
            sync_epochs(cfg, override_keys(job.overrides))
        if not isinstance(job.error, FolderInUse):  # (its record would be the other process's run's)
            record_refusal(job.run_dir, cfg, f"{type(job.error).__name__}: {job.error}")
        if searching():  # as train.py's task: the trial scores the worst value, the search goes on
            return returned_value(None, cfg)
        raise JobFailed(str(job.error)) from job.error

    return task


def dry_return(job: Job) -> JobReturn:
    """What a dry run reports for a job it did not run: completed, no value; an invalid job failed, as
    the sweep would fail it (so the dry run of a sweep with invalid jobs exits as that sweep does)."""
    ret = JobReturn(overrides=job.overrides, cfg=job.config, hydra_cfg=job.sweep_config, working_dir=os.getcwd(),
                    task_name=str(job.sweep_config.hydra.job.name),
                    status=JobStatus.FAILED if job.error else JobStatus.COMPLETED)
    ret.return_value = JobFailed(str(job.error)) if job.error else None
    return ret


def launch(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
           job_overrides: Sequence[Sequence[str]], initial_job_idx: int, *, max_members: int,
           max_memory_gib: float | None, dry_run: bool, executor: Executor | None, max_parallel: int | None,
           auto: bool) -> list[JobReturn]:
    """Launch a batch of jobs (see the module docstring); one JobReturn per job, in job order.
    ``executor``: None trains the populations one by one in this process; a ``processes`` executor
    (:func:`~optimlab.population.cluster.make_executor`) trains the CPU ones in forked processes, at
    most ``max_parallel`` at once (None: one per usable core), largest first; a submitit executor runs
    each as a submitit job, at most ``max_parallel`` at once. ``auto`` (``processes`` chosen by
    ``hydra.launcher.executor=auto``): in this process unless two or more populations can fork (one
    population trains faster inline, with all of torch's threads). ``max_memory_gib``: see :class:`MemoryBudget`."""
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    log.info(f"Population launcher: {len(job_overrides)} jobs, sweep output dir: {sweep_dir}")
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
    jobs = compose_jobs(hydra_context, config, job_overrides, initial_job_idx)
    check_plan_is_the_sweeps(config, jobs)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with held(sweep_dir) as ours:  # two sweeps would train the same populations into the same folders
        if not ours:
            raise PlanError(f"{sweep_dir}: another population sweep is running in this folder now; wait for it to "
                            "end, or stop it, then rerun with resume=auto (or choose another hydra.sweep.dir)")
        return launch_held(hydra_context, task_function, config, jobs, sweep_dir, max_members=max_members,
                           max_memory_gib=max_memory_gib, dry_run=dry_run, executor=executor,
                           max_parallel=max_parallel, auto=auto)


def launch_held(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig, jobs: list[Job],
                sweep_dir: Path, *, max_members: int, max_memory_gib: float | None, dry_run: bool,
                executor: Executor | None, max_parallel: int | None, auto: bool) -> list[JobReturn]:
    """:func:`launch`'s composed ``jobs`` planned and run while this process holds the sweep folder (a single run
    started in one of its jobs' folders meanwhile is refused)."""
    forked = executor is not None and executor.cluster == "processes"  # a forked child writes its members' files
    if forked and max_parallel is None:
        max_parallel = usable_cpus()
    classify_all(jobs, max_parallel if forked else 1, elsewhere=executor is not None and executor.cluster == "slurm")
    rejoin_stopped_populations(jobs, dry_run)
    budget = memory_budget(max_memory_gib, executor, max_parallel)
    populations = group(jobs, max_members, budget)
    named = [(f"population {i}", members) for i, members in enumerate(populations, 1)]
    # A forked child can use neither a GPU this process has used nor more than one CPU thread: such populations
    # train here.
    here = named if executor is None else [(name, members) for name, members in named
                                           if forked and not forkable(members)]
    # The largest first (members x bytes a member x epochs, roughly its work): processes running side by side then
    # end together, not with the largest alone at the end (the regime map's width-512 populations: minutes).
    elsewhere = sorted((entry for entry in named if entry not in here), key=lambda entry: -work(entry[1]))
    if auto and forked and len(elsewhere) < 2:
        executor, forked, here, elsewhere = None, False, named, []
    print(plan_text(jobs, populations, budget), flush=True)
    if forked and named:
        where = [f"{len(elsewhere)} population(s) in forked processes, {min(max_parallel, len(elsewhere))} at once, "
                 "one torch thread each"] if elsewhere else []
        where += [f"{len(here)} in this process (on a GPU, or trainer.num_threads > 1)"] if here else []
        print("  where: " + "; ".join(where), flush=True)
    if dry_run:
        returns = [dry_return(job) for job in jobs]
        remove_dry_sweep_folder(sweep_dir)
        return returns

    def run(job: Job, task: TaskFunction) -> JobReturn:
        """``task``, one of ours, as ``job``'s Hydra job; the sweep's task function as Hydra runs it. The
        job's logging stays set up: the caller sets the launcher's up again (:func:`launcher_logging`), as
        BasicLauncher does after each job, and once after a population's members (each sets its own up)."""
        if task is task_function:
            return run_job(hydra_context=hydra_context, task_function=task, config=job.sweep_config,
                           job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        return run_composed_job(hydra_context, task, job.sweep_config, job.config, job.run_dir)

    def launcher_logging() -> None:
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)

    returns: dict[int, JobReturn] = {}

    Trained = Generator[tuple[list[Job], list[RunSummary]], None, None]

    def in_this_process(named: list[tuple[str, list[Job]]]) -> Trained:
        for name, members in named:
            print(f"{name}: training {describe_members(members)}", flush=True)
            yield members, train_members(members, name)


    def all_trained() -> Trained:
        yield from in_this_process(here)
        if executor is None or not elsewhere:
            return
        if not forked:
            yield from run_as_jobs(executor, elsewhere, train_members, max_parallel, failed_members, describe_members)
            return
        room = machine_memory_share()
        children = run_as_jobs(executor, elsewhere, train_and_record, max_parallel, failed_and_recorded,
                               describe_members, admit=lambda running, members: fits_beside(running, members, room))
        for members, (results, held_stop) in children:
            try:
                yield members, results
            except BaseException as stop:  # thrown in (a stop while finishing) or closed: the children stop too
                children.throw(stop)
                raise
            if held_stop:  # a stop held while the child wrote the members' files: the sweep stops once they are done
                say(stopped_line(held_stop, names[id(members)]), sys.stderr)
                with contextlib.suppress(SystemExit):  # the other populations are stopped
                    children.throw(SystemExit(EXIT_CODES[held_stop]))
                sys.exit(EXIT_CODES[held_stop])

    trained = all_trained()
    recorded_elsewhere = {id(members) for _, members in elsewhere} if forked else set()
    names = {id(members): name for name, members in named}
    # Removed at the end, also of a stopped sweep, where empty (one a rerun's rejoin_stopped_populations emptied too)
    checkpoint_folders = {sweep_dir / CHECKPOINTS} | {PopulationCheckpoint([job.run_dir for job in members], []).path
                                                      .parent for members in populations}
    try:
        with contextlib.closing(trained):  # an error here stops the populations still training elsewhere
            for members, results in trained:
                recorded = id(members) in recorded_elsewhere
                # A stop while the members' jobs are finished waits for the last one: else the trained members not
                # yet finished would lose their test results, and one finished half would keep a partial record.
                with signals_deferred() as received:
                    try:
                        for job, summary in zip(members, results):
                            returns[job.num] = run(job, finish_member(job, summary, recorded))
                    finally:
                        launcher_logging()
                    if all(summary.status in FINISHED for summary in results):
                        PopulationCheckpoint([job.run_dir for job in members], []).remove()
                if received:
                    say(stopped_line(received[0], names[id(members)]), sys.stderr)
                    with contextlib.suppress(KeyboardInterrupt):  # elsewhere: the running populations are cancelled
                        trained.throw(KeyboardInterrupt(received[0]))
                    sys.exit(EXIT_CODES[received[0]])
    except KeyboardInterrupt as stop:  # while populations trained elsewhere: they were stopped, and so is the sweep
        sys.exit(exit_code(stop))
    finally:
        for folder in checkpoint_folders:
            with contextlib.suppress(OSError):  # one that still holds an unfinished population's checkpoint stays
                folder.rmdir()
    for job in jobs:
        if job.num not in returns:
            returns[job.num] = run(job, fail_job(job) if job.error else task_function)
            launcher_logging()
    return [returns[job.num] for job in jobs]
