"""Populations trained outside the launcher's process: in forked processes on this machine's cores, or
as submitit jobs (a sweep spread over a cluster as populations, not as tiny jobs).

``hydra.launcher.executor=processes`` trains each CPU population in a child process forked from the
launcher (no new interpreter, no imports: a fork takes milliseconds), ``hydra.launcher.max_parallel``
at once (default: the CPU cores this process may use), each child with one torch thread: GNU OpenMP
(torch's CPU threads) hangs in a child forked after its parent used threads, at its first parallel
region with more than one. Each child is its own process group, so a
Ctrl-C reaches the launcher only, which passes it on once to each child (:meth:`ForkedJob.cancel`);
a child whose launcher dies gets SIGTERM (Linux). Either way the child stops as an interrupted
population does (its members' summaries say ``interrupted``).

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

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from optimlab.checks import INT_NON_NEGATIVE, INT_POSITIVE, POSITIVE, refusal
from optimlab.console import say
from optimlab.signals import EXIT_CODES, exit_code, interrupt, signal_of, stop_signals_handled_by

Members = TypeVar("Members")
Results = TypeVar("Results")

# hydra.launcher.executor -> where its jobs run: forked processes here, or submitit's cluster
EXECUTORS = {"processes": "processes", "submitit_local": "local", "submitit_slurm": "slurm"}
# submitit takes any value for these and its job then fails unclearly (a probe: timeout_min=-5)
SUBMITIT_RULES = {"timeout_min": INT_POSITIVE, "cpus_per_task": INT_POSITIVE, "nodes": INT_POSITIVE,
                  "tasks_per_node": INT_POSITIVE, "gpus_per_node": INT_NON_NEGATIVE, "mem_gb": POSITIVE}
POLL_S = {"processes": 0.01, "local": 1.0, "slurm": 1.0}  # how often finished jobs are looked for
PR_SET_PDEATHSIG = 1  # linux/prctl.h


CGROUP_CPU_LIMIT = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "<quota> <period>" in microseconds, or "max <period>"


def usable_cpus() -> int:
    """The CPU cores this process may run on, within its container's CPU quota (a container limited to
    2 CPUs on a 64-core machine still sees 64 cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path(CGROUP_CPU_LIMIT).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


def default_executor() -> str:
    """``hydra.launcher.executor=auto``: ``processes`` where this process may use several CPU cores
    and can fork, else ``inline``."""
    return "processes" if usable_cpus() > 1 and can_fork() else "inline"


def stop_with_parent() -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (elsewhere: nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG,
                                                                                         signal.SIGTERM)


def single_threaded_child() -> None:
    """What a child forked from a process that may have used torch's CPU threads must do first: one
    thread (GNU OpenMP hangs at a parallel region with more; see the module docstring)."""
    torch.set_num_threads(1)


def run_in_child(send: Any, parent: int, train: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """A forked child's work: ``train(*args)``, its result sent back through ``send``. A stop signal
    ends it as ``train`` handles one (an interrupted population exits 130 or 143, sending nothing)."""
    single_threaded_child()
    for stop in (signal.SIGINT, signal.SIGTERM):  # until the population's own handling: an interrupt, not death
        signal.signal(stop, interrupt)
    os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the launcher, which passes it on exactly once
    stop_with_parent()
    try:
        if os.getppid() != parent:  # it died before the request above
            os.kill(os.getpid(), signal.SIGTERM)
        send.send(train(*args))
    except KeyboardInterrupt as stop:  # outside the population's own handling, which exits so itself
        sys.exit(exit_code(stop))


class ForkedJob:
    """``train(*args)`` in a child process forked from this one, with the part of submitit's Job
    interface that :func:`run_as_jobs` uses."""

    def __init__(self, train: Callable[..., Any], args: tuple[Any, ...]) -> None:
        context = multiprocessing.get_context("fork")
        self.receive, send = context.Pipe(duplex=False)
        # Daemonic: should this process end without cancelling it, Python's exit stops it (SIGTERM) instead of
        # waiting for its training (it starts no processes of its own).
        self.process = context.Process(target=run_in_child, args=(send, os.getpid(), train, args), daemon=True)
        gc.freeze()  # the child's garbage collector then leaves this process's objects (and their pages) alone
        try:
            self.process.start()
        finally:
            gc.unfreeze()
        send.close()
        self.job_id = str(self.process.pid)

    def done(self) -> bool:
        return self.receive.poll() or not self.process.is_alive()

    def result(self) -> Any:
        try:
            result = self.receive.recv()
        except EOFError:  # it ended without sending: stopped, killed, or it crashed (its traceback is on stderr)
            self.process.join()
            code = self.process.exitcode
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            raise RuntimeError(f"ended without a result ({how})") from None
        self.process.join()
        return result

    def cancel(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` (a stop signal) to the child, once."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signum)

    def wait(self) -> None:
        self.process.join()

    def stopped_by(self) -> str | None:
        """The stop signal that ended the (finished) process: its exit code (:data:`EXIT_CODES`), or
        the signal's default action (exit code minus the signal's number)."""
        return next((name for name, code in EXIT_CODES.items()
                     if self.process.exitcode in (code, -getattr(signal, name))), None)


class ForkingSubmitter:
    """Starts each submitted ``train(*args)`` as a :class:`ForkedJob`."""

    def submit(self, train: Callable[..., Any], *args: Any) -> ForkedJob:
        return ForkedJob(train, args)


@dataclass
class Executor:
    """Where populations train outside the launcher's process: ``make_submitter`` (a configured
    ``submitit.AutoExecutor``'s, or :class:`ForkingSubmitter`), the folder submitit's jobs write to
    (``%j``: the job id; empty for processes) and the cluster (``processes``: forked processes here;
    submitit's ``local``: new processes on this machine; ``slurm``)."""

    make_submitter: Callable[[], Any]
    folder: str
    cluster: str

    @functools.cached_property
    def submitter(self) -> Any:
        """Made for the first job: submitit's creates its folder, which a dry run or a sweep without a
        population to train would leave empty in the sweep's."""
        return self.make_submitter()

    @property
    def kind(self) -> str:
        """What one of its jobs is called on the console."""
        return "process" if self.cluster == "processes" else "submitit job"

    def where(self, job: Any) -> str:
        """Where ``job`` (one that was submitted) runs, for the console."""
        if self.cluster == "processes":
            return f"in process {job.job_id}"
        return f"submitted as submitit job {job.job_id} (log: {Path(job.paths.stdout)})"

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
    """An :class:`Executor` for ``executor`` (a key of :data:`EXECUTORS`). ``processes``: children
    forked here. submitit's: writing its logs and pickles under ``folder`` (``%j``: the job id), with ``parameters``
    (:func:`executor_parameters`). A ValueError with one line naming the key, before anything is
    written, when the platform cannot fork, submitit is missing, the cluster is not there (no
    ``srun`` for SLURM), a parameter is unknown to submitit or a count is not one (:data:`SUBMITIT_RULES`)."""
    if executor not in EXECUTORS:
        raise ValueError(f"hydra.launcher.executor: {executor!r} is not allowed; expected one of auto, inline, "
                         f"{', '.join(EXECUTORS)}")
    if executor == "processes":
        if not can_fork():
            raise ValueError("hydra.launcher.executor=processes needs fork (Linux, macOS); use inline")
        return Executor(ForkingSubmitter, "", "processes")
    parameters = executor_parameters(executor, parameters, torch.cuda.device_count())
    for key, value in parameters.items():
        if key in SUBMITIT_RULES and not SUBMITIT_RULES[key][0](value):
            raise ValueError(refusal(f"hydra.launcher.submitit.{key}", value, SUBMITIT_RULES[key][1]))
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
    return Executor(functools.partial(configured, folder), folder, EXECUTORS[executor])


def failure_line(err: Exception, limit: int = 600) -> str:
    """A failed job's error as one line of at most ``limit`` characters: its first two lines (where submitit says
    which job ended in what state, or that it failed) and the end of the rest (submitit's holds the job's whole
    error stream or traceback, whose start is Lightning's greeting and whose end says why)."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    head, tail = " ".join(lines[:2]), " ".join(lines[2:])
    room = limit - len(head) - 1
    if len(tail) > room:
        tail = "..." + tail[len(tail) - room + 3:] if room > 3 else ""
    return f"{head} {tail}".strip()[:limit]


def run_as_jobs(executor: Executor, populations: Sequence[tuple[str, Members]],
                train: Callable[[Members, str], Results], max_parallel: int | None,
                on_failure: Callable[[Members, str, str], Results], describe: Callable[[Members], str],
                admit: Callable[[list[Members], Members], bool] = lambda running, members: True,
                ) -> Generator[tuple[Members, Results], None, None]:
    """Submit ``train(members, name)`` for each population, in order, at most ``max_parallel`` at
    once (None: all; a cluster's scheduler queues them) and only while ``admit(the running ones'
    members, its members)`` (the first always starts), saying so with ``describe(members)``, and yield
    ``(members, results)`` as each job ends; the next population starts before the yield. A
    job that fails (killed, timed out, its process crashed) yields ``on_failure(members, name,
    error)``, except a forked process ended by a stop signal (exit 130 or 143): that stops the sweep
    as an interrupt here does. Interrupted here (Ctrl-C, or SIGTERM), or ended by an error thrown in
    or by the caller closing it, the running jobs are cancelled (forked processes get the same signal,
    SIGTERM for an error; each job writes its members' summaries as interrupted) and waited for, then
    the stop goes on. Either way :meth:`Executor.tidy` ends it."""
    pending = list(populations)
    running: list[tuple[Any, str, Members]] = []

    def start_pending() -> None:
        while pending and (max_parallel is None or len(running) < max_parallel) and \
                (not running or admit([entry[2] for entry in running], pending[0][1])):
            name, members = pending.pop(0)
            # A local job's controller shares this terminal: it inherits SIGINT ignored, so that a Ctrl-C stops the
            # job through the launcher (below), not by the controller's kill a second later (the job sets its own).
            with stop_signals_handled_by(signal.SIG_IGN, (signal.SIGINT,)) if executor.cluster == "local" else \
                    contextlib.nullcontext():
                job = executor.submitter.submit(train, members, name)
            say(f"{name}: training {describe(members)} {executor.where(job)}")
            running.append((job, name, members))

    try:
        start_pending()
        while running:
            with stop_signals_handled_by(interrupt):  # not SIGTERM's default, which would leave the jobs running
                done = [entry for entry in running if entry[0].done()]
                if not done:
                    time.sleep(POLL_S[executor.cluster])
                    continue
            # A process stopped by a signal stops the sweep: the others that ended give their results first.
            done.sort(key=lambda entry: executor.cluster == "processes" and entry[0].stopped_by() is not None)
            for entry in done:
                running.remove(entry)
                job, name, members = entry
                try:
                    results = job.result()
                # its process ended without a result; submitit's FailedJobError / UncompletedJobError
                except Exception as err:
                    if executor.cluster == "processes" and (stop := job.stopped_by()):
                        # Stopped by a signal sent to it: its members' folders say interrupted; the sweep stops too.
                        raise SystemExit(EXIT_CODES[stop]) from None
                    error = failure_line(err)
                    say(f"{name}: {executor.kind} {job.job_id} failed: {error}")
                    results = on_failure(members, name, f"{executor.kind} {job.job_id} failed: {error}")
                start_pending()  # the next population trains while the caller finishes this one's members
                yield members, results
    # also SystemExit (train.py's handler of a signal before any run starts), GeneratorExit
    except BaseException as stop:
        if running:
            plural = "es" if executor.cluster == "processes" else "s"
            say(f"stopped: cancelling {len(running)} running {executor.kind}{plural if len(running) > 1 else ''}",
                sys.stderr)
        for job, _, _ in running:
            if executor.cluster == "processes":
                job.cancel(signum=signal_of(stop))
            elif executor.cluster == "local":
                # A local job's id is its controller's pid, which passes SIGTERM on to the job. Its cancel sends
                # SIGINT, on which the controller prints a traceback and kills the job a second later, before
                # a large population has written its members' records.
                if not job.done():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(job.job_id), signal.SIGTERM)
            else:
                job.cancel(check=False)
        for job, _, _ in running:
            job.wait()
        raise
    finally:
        executor.tidy()
