"""The population launcher's work: a Hydra sweep's jobs grouped into populations and trained together.

``python train.py -m hydra/launcher=population <sweep>`` (plugin:
``hydra_plugins.optimlab_population``) calls :func:`launch`, which

1. composes every job's config as Hydra's BasicLauncher does (``hydra.job.num``/``id``, its own
   output dir from ``hydra.sweep.dir``/``subdir``);
2. sorts the jobs: one whose config is invalid fails alone (its one-line ConfigError/DataError
   message recorded in a ``crashed`` summary.json); one that a population cannot reproduce
   (:func:`why_alone`), or whose folder already holds a run, runs through the sweep's task
   function (``train.py``'s ``main``, hence :func:`optimlab.train.run`) as in a sequential sweep;
   the others are grouped by everything but their member-wise settings (:data:`MEMBER_WISE`), and
   groups larger than ``max_members`` or than the memory a population may use (:class:`MemoryBudget`)
   are split evenly;
3. prints the plan (populations, members, estimated memory) and stops there with ``dry_run``;
4. trains each population (:mod:`optimlab.population`) in this process, or as a submitit job
   (``hydra.launcher.executor``, :mod:`optimlab.population.cluster`), writing every member's ``running``
   summary after each epoch, then finishes each member as a Hydra job (``.hydra/`` files, job
   logging, callbacks, a JobReturn: :func:`~optimlab.hydra_job.run_composed_job`, ``run_job``'s
   steps without its copies of the config) whose task writes its final summary and TensorBoard events.

JobReturns come back in job order, as BasicLauncher's do, so a failed job makes ``-m`` exit non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from optimlab.build import build_parts, optimizer_class
from optimlab.checkpointing import holds_a_run, last_checkpoint
from optimlab.data import DataError, ensure_files, epoch_batches, load_split, resolve_root
from optimlab.hydra_job import JobFailed, hydra_config_of, run_composed_job, save_job_record
from optimlab.optim import Optimizer
from optimlab.population.checkpoint import PopulationCheckpoint
from optimlab.population.cluster import Executor, run_as_jobs
from optimlab.population.curvature import MemberSharpness
from optimlab.population.data import PopulationData, split_indices
from optimlab.population.loop import MemberRecord, PopulationLoop, member_optimizer
from optimlab.population.records import PopulationRun, member_summary, write_member
from optimlab.population.stacked import StackedCNN, StackedMLP, StackedModel, build_member
from optimlab.record import device_name, log_epoch_lines, record_refusal, refused_summary, result_line
from optimlab.summary import (FINISHED, RunSummary, config_key, describe_run, is_complete, optimized_value,
                              read_summary, write_summary)
from optimlab.train import StopOnSignal, refuse_changed_config, signals_deferred
from optimlab.validate import ConfigError, validate_config

log = logging.getLogger(__name__)

STACKED: dict[str, type[StackedModel]] = {"optimlab.models.MLP": StackedMLP, "optimlab.models.CNN": StackedCNN}
DTYPES = {"32-true": torch.float32, "32": torch.float32, "64-true": torch.float64, "64": torch.float64}
# Keys in which the members of one population may differ (each member applies its own), and keys
# that do not change what a population computes (its reporting, or options it refuses anyway).
MEMBER_WISE = ("name", "lr", "seed", "resume", "regimes", "optimizer.lr", "optimizer.weight_decay", "data.seed",
               "data.label_noise", "model.init", "model.init_std", "trainer.progress_bar",
               "trainer.log_every_n_steps", "trainer.check_finite_every_n_steps", "test_ckpt",
               "optimized_metric", "callbacks.progress_bar")
# What a population does itself, the way a single run's defaults do: its trainer keys, callbacks and logger.
POPULATION_TRAINER = ("_target_", "accelerator", "devices", "precision", "deterministic", "max_epochs",
                      "log_every_n_steps", "check_finite_every_n_steps", "progress_bar", "num_threads",
                      "flush_denormal", "compile", "limit_train_batches", "fast_dev_run", "enable_model_summary")
POPULATION_CALLBACKS = ("model_checkpoint", "progress_bar")
TRAINER_DEFAULTS = {name: p.default for name, p in inspect.signature(L.Trainer).parameters.items()}


class PlanError(CompactHydraException):
    """A sweep the launcher cannot plan; Hydra prints its one line (a compact exception), not a traceback."""


class PopulationCrashed(JobFailed):
    """The population a job trained in stopped with an error (logged with its traceback when it
    stopped); every member's job fails with it."""


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

    @functools.cached_property
    def config(self) -> DictConfig:
        """The task's config, without the ``hydra`` node (what the task function receives); computed
        once, and without copying the large ``hydra`` node first (times every job, that was seconds)."""
        config = OmegaConf.masked_copy(self.sweep_config, [key for key in self.sweep_config if key != "hydra"])
        OmegaConf.set_struct(config, True)
        return config

    @functools.cached_property
    def memory(self) -> MemoryEstimate:
        """What a population of jobs like this one needs (:func:`estimate_memory`); computed once per
        group of jobs that can share a population (:func:`group` hands it to the others)."""
        return estimate_memory(self.config)


def compose_jobs(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
                 initial_job_idx: int) -> list[Job]:
    """Every job's config and output dir, as BasicLauncher and ``run_job`` make them."""
    jobs = []
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        with hydra_config_of(sweep_config):
            run_dir = Path(str(OmegaConf.select(sweep_config, "hydra.sweep.dir"))) / \
                str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))
        jobs.append(Job(idx, list(overrides), sweep_config, Path(os.path.abspath(run_dir))))
    return jobs


# ---- sorting the jobs ---------------------------------------------------------------------------

def check(cfg: DictConfig) -> None:
    """Raise the ConfigError or DataError :func:`optimlab.train.run` would raise before training:
    the config's rules, the constructors' checks (the parts built as ``run`` builds them) and the
    data split (the files and the sizes)."""
    validate_config(cfg)
    with torch.random.fork_rng(devices=[]):  # building draws init weights: leave the caller's generator alone
        datamodule = build_parts(cfg).datamodule
    n = training_images(Path(datamodule.root), datamodule.download)
    split = split_indices(n, datamodule.val_size, datamodule.subset, datamodule.label_noise, datamodule.seed)
    epoch_batches(len(split.train_labels), datamodule.batch_size, cfg.trainer.limit_train_batches)


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


def population_device(accelerator: str) -> torch.device | None:
    """The device Lightning's ``accelerator`` gives a single run, or None where a population cannot follow (MPS)."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps" or torch.backends.mps.is_available():
        return None
    return torch.device("cpu")


def why_alone(cfg: DictConfig) -> str | None:
    """Why the population loop cannot reproduce this (valid) job's run, or None when it can."""
    t, optimizer = cfg.trainer, cfg.optimizer
    extra_callbacks = {name for name, entry in (cfg.get("callbacks") or {}).items() if entry} - set(POPULATION_CALLBACKS)
    loggers = {name for name, entry in (cfg.get("logger") or {}).items() if entry}
    trainer_args = {f"trainer.{key}={value}" for key, value in t.items()
                    if key not in POPULATION_TRAINER and value != TRAINER_DEFAULTS.get(key)}
    reasons = {
        ", ".join(sorted(trainer_args)): bool(trainer_args),
        f"model {cfg.model.get('_target_')} cannot be stacked": cfg.model.get("_target_") not in STACKED,
        "model.dropout > 0": (cfg.model.get("dropout") or 0) > 0,
        "optimizer.impl=torch (member-wise groups are optimlab.optim's)": optimizer.get("impl") == "torch",
        "optimizer.grad_noise_std > 0": (optimizer.get("grad_noise_std") or 0) > 0,
        "a learning-rate scheduler": bool(cfg.get("scheduler")),
        "callbacks other than the defaults (" + ", ".join(sorted(extra_callbacks)) + ")": bool(extra_callbacks),
        "a logger other than TensorBoard": set(loggers) != {"tensorboard"},
        "trainer.max_epochs given apart from epochs": t.get("max_epochs", cfg.epochs) != cfg.epochs,
        "test_ckpt=best": cfg.test_ckpt == "best",
        f"trainer.precision={t.precision}": str(t.precision) not in DTYPES,
        "trainer.compile": bool(t.compile),
        "trainer.limit_train_batches=0": t.limit_train_batches == 0,
        "trainer.fast_dev_run": bool(t.fast_dev_run),
        "an MPS device": population_device(t.accelerator) is None,
        f"{Optimizer.__module__}.Optimizer subclasses only": not issubclass(optimizer_class(optimizer)[0], Optimizer),
    }
    found = [reason for reason, applies in reasons.items() if applies]
    return ", ".join(found) or None


def population_key(cfg: DictConfig) -> str:
    """The resolved config without its :data:`MEMBER_WISE` keys: jobs with equal keys can share a population."""
    return config_key(OmegaConf.to_container(cfg, resolve=True), MEMBER_WISE)


def classify(job: Job) -> None:
    """Decide how ``job`` runs: fails (``error``), alone (``alone``) or in a population (``key``)."""
    cfg = job.config
    resume = cfg.get("resume")
    # What the single-run path already decides (skip, resume, refuse to overwrite) stays its decision.
    if resume not in (None, "auto"):
        job.alone = f"resume={resume}"
    elif resume is None and holds_a_run(job.run_dir):
        job.alone = "its folder already holds a run"
    elif resume == "auto" and is_complete(job.run_dir):
        job.alone = "complete (resume=auto skips it)"
    elif resume == "auto" and last_checkpoint(job.run_dir) is not None:
        job.alone = "resumes from its checkpoint"
    if job.alone:
        return
    try:
        with hydra_config_of(job.sweep_config):
            check(cfg)
            if resume == "auto" and (saved := read_summary(job.run_dir)) is not None:
                refuse_changed_config(job.run_dir, saved, cfg)
    except (ConfigError, DataError) as err:
        job.error = err
        return
    job.alone = why_alone(cfg)
    if job.alone is None:
        job.key = population_key(cfg)


def data_order(cfg: DictConfig) -> tuple[int, float]:
    """Where a job goes among its population's members: by the data it sees (``data.seed``, ``data.label_noise``;
    the other data options are the population's)."""
    return int(cfg.data.seed), float(cfg.data.label_noise)


def group(jobs: Sequence[Job], max_members: int,
          budget: Callable[[DictConfig], int | None] = lambda cfg: None) -> list[list[Job]]:
    """The populations: jobs with equal keys, ordered by their data (seed, label noise; else in job
    order), so that members which share their batches sit side by side (PopulationData gathers one
    batch per run of them), split evenly into parts of at most ``max_members`` and of at most as
    many as fit in ``budget(config)`` bytes (None: no bound) by :func:`estimate_memory`; a job left
    without a partner, or whose group cannot fit two members, runs alone."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if job.key is not None:
            groups.setdefault(job.key, []).append(job)
    populations = []
    for members in groups.values():
        members.sort(key=lambda job: data_order(job.config))
        limit, room = max_members, budget(members[0].config)
        if room is not None:
            need = members[0].memory
            for job in members:
                job.memory = need  # the same model and data: one estimate serves the group's plan lines too
            limit = min(limit, need.members_within(room))
            if limit < 2:
                why = (f"two members would need ~{need.total(2) / 2**20:,.0f} MiB, more than a population's memory "
                       f"budget ({room / 2**20:,.0f} MiB)")
                if limit == 0:
                    why += "; even one may not fit"
                for job in members:
                    job.alone, job.key = why, None
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


# ---- the plan -----------------------------------------------------------------------------------

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
    temporary of the update; every tensor its optimizer holds after two steps (state and reused
    buffers, counted on the single model); the larger of a training step's activations (kept for
    the backward pass, with their gradients) and an evaluation chunk's; its index tensors; with
    sharpness tracking, its Lanczos basis with the temporaries of a product and its probe's activations
    through a double backward."""
    size = DTYPES[str(cfg.trainer.precision)].itemsize
    with torch.random.fork_rng(devices=[]):
        model = build_member(cfg.model, cfg.seed)
    cls, options = optimizer_class(cfg.optimizer)
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
    if (cfg.get("curvature") or {}).get("every_n_steps"):  # its Lanczos basis, and its probe with a double backward
        curvature = cfg.curvature
        # 16 parameter-sized vectors more than the basis: the gradient with its graph, the product and the
        # reorthogonalisation's temporaries (measured against peak resident memory, docs/population.md).
        tracking = (curvature.iters + 16) * params * size + curvature.probe_size * (28 * 28 * 4 + 4 * activations * size)
    return MemoryEstimate(shared=(n + 10_000) * 28 * 28 * 4,
                          per_member=(4 * params + held) * size + max(step, evaluation) + indices + tracking)


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


def memory_budget(max_memory_gib: float | None, executor: Executor | None, max_parallel: int | None) -> MemoryBudget:
    """The budget for populations trained in this process (one at a time), as submitit_local jobs (on
    this machine, ``max_parallel`` at once) or as SLURM jobs (on machines the plan cannot see)."""
    if executor is None:
        return MemoryBudget(max_memory_gib, 1)
    if executor.cluster == "slurm":
        return MemoryBudget(max_memory_gib, None, "the populations train on other machines "
                                                  "(set population.max_memory_gib)")
    return MemoryBudget(max_memory_gib, max_parallel, "submitit_local trains every population at once "
                                                      "(set hydra.launcher.max_parallel or population.max_memory_gib)")


def describe_population(members: Sequence[Job]) -> str:
    """One line: the shared architecture and training, the members' learning rates and seeds."""
    cfg = members[0].config
    run = describe_run(OmegaConf.to_container(cfg, resolve=True))
    lrs = sorted({float(job.config.optimizer.lr) for job in members})
    seeds = sorted({int(job.config.seed) for job in members})
    device = population_device(cfg.trainer.accelerator)
    return (f"{run.model} {run.widths or '-'}, {run.optimizer}, {cfg.epochs} epochs of batch {cfg.data.batch_size}, "
            f"{str(DTYPES[str(cfg.trainer.precision)]).removeprefix('torch.')} on {device}; "
            f"lr {', '.join(f'{lr:g}' for lr in lrs)}; seed {', '.join(map(str, seeds))}; "
            f"~{members[0].memory.total(len(members)) / 2**20:,.0f} MiB")


def plan_text(jobs: Sequence[Job], populations: Sequence[Sequence[Job]], budget: MemoryBudget) -> str:
    """The launch plan, as printed before training."""
    pooled = sum(len(p) for p in populations)
    alone = [job for job in jobs if job.alone]
    failed = [job for job in jobs if job.error]
    lines = [f"population launcher: {len(jobs)} jobs -> {pooled} in {len(populations)} population(s), "
             f"{len(alone)} alone, {len(failed)} invalid", *budget.plan_lines()]
    for i, members in enumerate(populations, 1):
        nums = ", ".join(f"#{job.num}" for job in members)
        lines.append(f"  population {i}: {len(members)} members (jobs {nums}): {describe_population(members)}")
    lines += [f"  job #{job.num} alone: {job.alone}" for job in alone]
    lines += [f"  job #{job.num} invalid: {job.error}" for job in failed]
    return "\n".join(lines)


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
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        losses = super().step(x, y, last)
        sync()
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


def train_members(members: Sequence[Job], name: str) -> list[RunSummary]:
    """Train ``members`` as one population; each member's final summary (``complete`` or
    ``diverged``, tested on the test set with its last weights), or, if the population stops with
    an error, each member's ``crashed`` summary with that error. After each epoch the population's
    checkpoint (:class:`~optimlab.population.checkpoint.PopulationCheckpoint`) is saved, then each
    member's ``running`` summary written; under ``resume=auto`` a population whose checkpoint exists
    continues from it. Interrupted (SIGINT, SIGTERM): the members' summaries say ``interrupted`` and
    the process exits 130 or 143, as a single run does."""
    started = time.perf_counter()
    configs = [job.config for job in members]
    resolved = [OmegaConf.to_container(c, resolve=True) for c in configs]
    first = configs[0]
    records = [MemberRecord() for _ in members]
    noisy = [0] * len(members)
    checkpoint = PopulationCheckpoint([job.run_dir for job in members], resolved)
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
        for m, (job, summary) in enumerate(zip(members, summaries(status))):
            if not keeps_old(m):
                job.run_dir.mkdir(parents=True, exist_ok=True)
                write_summary(job.run_dir, summary)

    def on_epoch(done: int) -> None:
        population.first_step_s = loop.first_step_s
        checkpoint.save(loop.state_dict(), first_step_s=loop.first_step_s, wall_time_s=wall_time())
        write_all("running")
        # Printed once saved: a Ctrl-C answering the line finds the epoch kept.
        rows = [r.history[-1] for r in records if r.history and r.history[-1]["epoch"] == done]
        val = [row["val_acc"] for row in rows if math.isfinite(row.get("val_acc", math.nan))]
        training = sum(not r.diverged for r in records)
        print(f"{name}: epoch {done:>3}/{first.epochs} | {training}/{len(records)} members training | val acc "
              f"{min(val, default=math.nan):.4f}-{max(val, default=math.nan):.4f} | "
              f"{rows[0]['train_time_s'] if rows else 0.0:.1f}s", flush=True)

    # SIGINT/SIGTERM raise KeyboardInterrupt; inside the fit, Lightning's graceful shutdown ends in SystemExit.
    stopper = StopOnSignal()
    try:
        with stopper.handling():
            torch.set_flush_denormal(first.trainer.flush_denormal)
            set_deterministic(first.trainer.deterministic)
            if first.trainer.num_threads:
                torch.set_num_threads(first.trainer.num_threads)
            device = population_device(first.trainer.accelerator)
            if device.type == "cpu":
                keep_freed_memory()
            dtype = DTYPES[str(first.trainer.precision)]
            model = STACKED[first.model._target_].from_configs([c.model for c in configs], [c.seed for c in configs])
            model = model.to(device=device, dtype=dtype)
            data = PopulationData([instantiate(c.data) for c in configs], device, first.trainer.limit_train_batches)
            cls, options = optimizer_class(first.optimizer)
            for key in ("lr", "weight_decay"):
                options.pop(key, None)
            optimizer = member_optimizer(cls, model, [float(c.optimizer.lr) for c in configs],
                                         [float(c.optimizer.get("weight_decay") or 0.0) for c in configs], **options)
            population.device, population.dtype = device_name(device), str(dtype).removeprefix("torch.")
            population.steps_per_epoch, population.train_size = data.steps_per_epoch, data.train_size
            population.params = sum(p[0].numel() for p in model.parameters())
            noisy[:] = data.noisy_counts
            tracking = first.get("curvature") or {}
            sharpness = MemberSharpness(tracking.every_n_steps, [c.seed for c in configs], tracking.probe_size,
                                        tracking.iters, tracking.tol, tracking.log_spaced_start) \
                if tracking.get("every_n_steps") else None
            loop = ReportingLoop(model, optimizer, data, [c.trainer.log_every_n_steps for c in configs], sharpness,
                                 on_epoch=on_epoch)
            records = loop.records
            if all(c.get("resume") == "auto" for c in configs):
                saved, why_not = checkpoint.load(device)
                if saved is None:
                    print(f"{name}: starting from scratch ({why_not})", flush=True)
                else:
                    loop.load_state_dict(saved["loop"])
                    loop.first_step_s, earlier_wall_s = saved["first_step_s"], saved["wall_time_s"]
                    population.first_step_s = loop.first_step_s
                    print(f"{name}: resumed from {checkpoint.path} after epoch {loop.epochs_done}", flush=True)
            write_all("running")
            loop.fit(first.epochs, test_every_epoch=first.data.test_every_epoch, callbacks=[stopper])
            test_loss, test_acc = loop.evaluate(data.test_batches(), shared=True).tolist()
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Lightning's exit after its graceful shutdown
        signal_name = stopper.requested or "SIGINT"
        write_all("interrupted")
        where = "from its checkpoint" if checkpoint.path.is_file() else "from the start (no epoch had finished)"
        print(f"{name} interrupted ({signal_name}); its members' folders hold their summaries so far; "
              f"rerun the sweep with resume=auto to continue {where}", file=sys.stderr)
        sys.exit(143 if signal_name == "SIGTERM" else 130)
    except Exception as err:  # the whole population stops: every member's job fails with the error
        log.exception(f"{name} crashed")
        error = f"{type(err).__name__}: {err}"
        return [crashed_record(job, name, error) if keeps_old(m) else summary
                for m, (job, summary) in enumerate(zip(members, summaries("crashed", error=error)))]
    population.checkpoint = None  # removed once every member has finished (launch)
    final = summaries(None, tested_checkpoint="last")
    for summary, loss, acc in zip(final, test_loss, test_acc):
        summary.test_loss, summary.test_acc = loss, acc
    return final


# ---- the jobs -----------------------------------------------------------------------------------

def finish_member(job: Job, summary: RunSummary) -> TaskFunction:
    """The task of a member's Hydra job: its summary and TensorBoard events written, its epoch lines
    and result logged (the job's ``train.log`` and the console); returns its ``optimized_metric`` as
    ``train.py``'s task does, or fails with the population's error (crashed, or interrupted as a
    submitit job)."""
    def task(cfg: DictConfig) -> float | None:
        save_job_record(job.run_dir, cfg)
        write_member(job.run_dir, summary)
        log_epoch_lines(summary, int(cfg.epochs))  # the job's train.log holds what its run's would
        if summary.status in ("crashed", "interrupted"):
            raise PopulationCrashed(f"{summary.population['name']} {summary.status}: {summary.error}")
        log.info(result_line(summary))
        return optimized_value(summary, cfg.get("optimized_metric", "val/acc_best"))

    return task


def crashed_record(job: Job, name: str, error: str, stopped: bool = False) -> RunSummary:
    """What ``job``'s folder holds (its epochs so far), ``crashed`` with ``error``, or ``interrupted``
    where it says so and ``stopped`` (a cancelled submitit job wrote it); or a bare crashed summary
    where it holds nothing; as a member of ``name``."""
    summary = read_summary(job.run_dir) or refused_summary(job.config, error)
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
    def task(cfg: DictConfig) -> None:
        assert job.error is not None
        print(f"error: {job.error}", file=sys.stderr)
        record_refusal(job.run_dir, cfg, f"{type(job.error).__name__}: {job.error}")
        raise JobFailed(str(job.error)) from job.error

    return task


def dry_return(job: Job) -> JobReturn:
    """What a dry run reports for a job it did not run: completed, no value."""
    ret = JobReturn(overrides=job.overrides, cfg=job.config, hydra_cfg=job.sweep_config, working_dir=os.getcwd(),
                    task_name=str(job.sweep_config.hydra.job.name), status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret


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


def launch(hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig,
           job_overrides: Sequence[Sequence[str]], initial_job_idx: int, *, max_members: int = 64,
           max_memory_gib: float | None = None, dry_run: bool = False, executor: Executor | None = None,
           max_parallel: int | None = None) -> list[JobReturn]:
    """Launch a batch of jobs (see the module docstring); one JobReturn per job, in job order.
    ``executor``: None trains the populations one by one in this process; a submitit executor
    (:func:`~optimlab.population.cluster.make_executor`) runs each as a submitit job, at most
    ``max_parallel`` at once. ``max_memory_gib``: see :class:`MemoryBudget`."""
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    log.info(f"Population launcher: {len(job_overrides)} jobs, sweep output dir: {sweep_dir}")
    for idx, overrides in enumerate(job_overrides, initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
    jobs = compose_jobs(hydra_context, config, job_overrides, initial_job_idx)
    check_plan_is_the_sweeps(config, jobs)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        classify(job)
    budget = memory_budget(max_memory_gib, executor, max_parallel)
    populations = group(jobs, max_members, budget)
    print(plan_text(jobs, populations, budget), flush=True)
    if dry_run:
        return [dry_return(job) for job in jobs]

    def run(job: Job, task: TaskFunction) -> JobReturn:
        """``task``, one of ours, as ``job``'s Hydra job; the sweep's task function as Hydra runs it."""
        if task is task_function:
            ret = run_job(hydra_context=hydra_context, task_function=task, config=job.sweep_config,
                          job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        else:
            ret = run_composed_job(hydra_context, task, job.sweep_config, job.config, job.run_dir)
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
        return ret

    returns: dict[int, JobReturn] = {}
    named = [(f"population {i}", members) for i, members in enumerate(populations, 1)]

    def in_this_process() -> Generator[tuple[list[Job], list[RunSummary]], None, None]:
        for name, members in named:
            print(f"{name}: training {len(members)} members (jobs {', '.join(f'#{job.num}' for job in members)})",
                  flush=True)
            yield members, train_members(members, name)

    trained = in_this_process() if executor is None else run_as_jobs(executor, named, train_members, max_parallel,
                                                                     failed_members)
    names = {id(members): name for name, members in named}
    for members, results in trained:
        # A stop while the members' jobs are finished waits for the last one: else the trained members not
        # yet finished would lose their test results, and one finished half would keep a partial record.
        with signals_deferred() as received:
            for job, summary in zip(members, results):
                returns[job.num] = run(job, finish_member(job, summary))
            if all(summary.status in FINISHED for summary in results):
                PopulationCheckpoint([job.run_dir for job in members], []).remove()
        if received:
            print(f"stopped ({received[0]}) once {names[id(members)]}'s members were finished; rerun the sweep "
                  f"with resume=auto to run the rest", file=sys.stderr)
            with contextlib.suppress(KeyboardInterrupt):  # submitit: the running populations are cancelled
                trained.throw(KeyboardInterrupt(received[0]))
            sys.exit(143 if received[0] == "SIGTERM" else 130)
    for job in jobs:
        if job.num not in returns:
            returns[job.num] = run(job, fail_job(job) if job.error else task_function)
    return [returns[job.num] for job in jobs]
