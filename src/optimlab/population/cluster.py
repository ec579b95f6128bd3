"""Populations as submitit jobs: a sweep spread over a cluster as populations, not as tiny jobs.

``python train.py -m hydra/launcher=population hydra.launcher.executor=submitit_slurm <sweep>``
submits each population as one job of `submitit <https://github.com/facebookincubator/submitit>`_
(the engine under Hydra's submitit launcher; ``submitit_local`` runs the jobs as processes on this
machine), with ``hydra.launcher.submitit``'s parameters (``timeout_min``, ``cpus_per_task``,
``gpus_per_node``, ``slurm_partition``, ...; see ``submitit.AutoExecutor.update_parameters``). A job
runs :func:`~optimlab.population.launcher.train_members`, which writes every member's summary after
each epoch and the population's checkpoint, and returns the members' final summaries; the launcher
then finishes each member as a Hydra job here, as it does for a population trained in its own process.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

Members = TypeVar("Members")
Results = TypeVar("Results")

EXECUTORS = {"submitit_local": "local", "submitit_slurm": "slurm"}  # hydra.launcher.executor -> submitit's cluster
POLL_S = 1.0  # how often finished jobs are looked for


@dataclass
class Executor:
    """A configured ``submitit.AutoExecutor``, the folder its jobs write to (``%j``: the job id) and
    submitit's cluster (``local``: processes on this machine, ``slurm``)."""

    auto: Any
    folder: str
    cluster: str

    def tidy(self) -> None:
        """Remove the folder named like the template itself (``.submitit/%j``) when it is empty:
        submitit's local jobs create it besides their own."""
        template = Path(self.folder)
        if "%" in str(template) and template.is_dir() and not any(template.iterdir()):
            template.rmdir()


def executor_parameters(executor: str, parameters: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    """``parameters`` as given, except that local jobs see this machine's ``gpus`` GPUs unless
    ``gpus_per_node`` says otherwise: submitit's local executor hides every GPU from a job
    (``CUDA_VISIBLE_DEVICES`` empty) unless told how many it gets, so a population planned for the
    GPU would silently train on the CPU. Local jobs running at once share the GPUs."""
    if executor == "submitit_local" and "gpus_per_node" not in parameters:
        return {**parameters, "gpus_per_node": gpus}
    return dict(parameters)


def make_executor(executor: str, folder: str, parameters: Mapping[str, Any]) -> Executor:
    """An :class:`Executor` for ``executor`` (a key of :data:`EXECUTORS`) writing its logs and
    pickles under ``folder`` (``%j``: the job id), with ``parameters`` (:func:`executor_parameters`).
    A ValueError with one line naming the key, before anything is written, when submitit is missing,
    the cluster is not there (no ``srun`` for SLURM) or a parameter is unknown to submitit."""
    if executor not in EXECUTORS:
        raise ValueError(f"hydra.launcher.executor: {executor!r} is not allowed; expected one of inline, "
                         f"{', '.join(EXECUTORS)}")
    parameters = executor_parameters(executor, parameters, torch.cuda.device_count())
    try:
        import submitit
    except ImportError:
        raise ValueError(f"hydra.launcher.executor={executor} needs submitit: pip install submitit") from None

    def configured(where: str) -> Any:
        try:
            auto = submitit.AutoExecutor(folder=where, cluster=EXECUTORS[executor])
        except RuntimeError as err:
            raise ValueError(f"hydra.launcher.executor={executor}: {' '.join(str(err).split())}") from None
        try:
            auto.update_parameters(**dict(parameters))
        except (NameError, ValueError, TypeError, AssertionError) as err:  # unknown names: NameError; types: assert
            raise ValueError(f"hydra.launcher.submitit: {' '.join(str(err).split())}") from None
        return auto

    with tempfile.TemporaryDirectory() as scratch:  # submitit creates its folder: check in a scratch one first
        configured(scratch)
    return Executor(configured(folder), folder, EXECUTORS[executor])


def run_as_jobs(executor: Executor, populations: Sequence[tuple[str, Members]],
                train: Callable[[Members, str], Results], max_parallel: int | None,
                on_failure: Callable[[Members, str, str], Results]) -> Generator[tuple[Members, Results], None, None]:
    """Submit ``train(members, name)`` for each population, at most ``max_parallel`` at once (None:
    all; a cluster's scheduler queues them), and yield ``(members, results)`` as each job ends. A
    job that fails (killed, timed out, its process crashed) yields ``on_failure(members, name,
    error)``. Interrupted here (Ctrl-C), the running jobs are cancelled (each writes its members'
    summaries as interrupted) and waited for, then the interrupt goes on. Either way
    :meth:`Executor.tidy` ends it."""
    pending = list(populations)
    running: list[tuple[Any, str, Members]] = []
    try:
        while pending or running:
            while pending and (max_parallel is None or len(running) < max_parallel):
                name, members = pending.pop(0)
                job = executor.auto.submit(train, members, name)
                print(f"{name}: submitted as submitit job {job.job_id} (log: {Path(job.paths.stdout)})", flush=True)
                running.append((job, name, members))
            done = [entry for entry in running if entry[0].done()]
            if not done:
                time.sleep(POLL_S)
                continue
            for entry in done:
                running.remove(entry)
                job, name, members = entry
                try:
                    results = job.result()
                except Exception as err:  # submitit's FailedJobError / UncompletedJobError
                    error = " ".join(str(err).split())[:600]  # its start says why; the log's tail follows
                    print(f"{name}: submitit job {job.job_id} failed: {error}", flush=True)
                    results = on_failure(members, name, f"submitit job {job.job_id} failed: {error}")
                yield members, results
    except (KeyboardInterrupt, SystemExit):  # SystemExit: train.py's handler of a signal before any run starts
        if running:
            print(f"stopped: cancelling {len(running)} running submitit job(s)", file=sys.stderr, flush=True)
        for job, _, _ in running:
            job.cancel(check=False)
        for job, _, _ in running:
            job.wait()
        raise
    finally:
        executor.tidy()
