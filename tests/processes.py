"""``python <args>`` as a process of its own (its own pid, signals, exit status and output), forked
from a server that has imported what train.py imports instead of started afresh: a new interpreter
spends about 6 s of CPU importing torch, Lightning and Hydra (AMD EPYC, 2 cores), and the tests that
signal, kill or patch a run start two dozen of them. The server imports and does nothing else.
What a child does not share with ``python train.py``: the server's string-hash seed, its
``multiprocessing`` identity (not the main process; the code under test forks with an explicit
context), and its exit, which skips the interpreter's exit handlers, as a killed run does (a run's
records never wait for them). Tests that need those start a new interpreter with ``subprocess``."""

from __future__ import annotations

import atexit
import multiprocessing.util  # its exit handler registered before ours: ours runs first
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOADED = ["torch", "lightning.pytorch", "hydra", "optimlab.train", "optimlab.population.launcher"]
SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload(PRELOADED)


def _run_python(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the child: what ``python <args>`` does, run from ``cwd`` with ``env``, writing to ``out`` and ``err``."""
    for fd, path in ((1, out), (2, err)):  # first: whatever fails below is written there
        with open(path, "wb") as file:
            os.dup2(file.fileno(), fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(args)
        sys.path.insert(0, str(Path(args[0]).resolve().parent))  # as python does for a script
        runpy.run_path(args[0], run_name="__main__")


class Process:
    """What the tests use of :class:`subprocess.Popen` (text output, read at the end), except that
    ``wait`` kills the child when it times out, as :func:`subprocess.run` does."""

    def __init__(self, *args: str, cwd: Path | str | None = None) -> None:
        self.args = [sys.executable, *args]
        self._output = tempfile.TemporaryDirectory(prefix="process-")  # removed when the object goes
        self._out, self._err = (os.path.join(self._output.name, name) for name in ("out", "err"))
        for path in (self._out, self._err):
            Path(path).touch()  # there even if the child fails before it writes
        folder = str(Path(cwd or os.getcwd()).resolve())
        self._child = SERVER.Process(target=_run_python, args=(list(args), folder, dict(os.environ), self._out,
                                                                self._err))
        self._child.start()
        self.pid = self._child.pid

    @property
    def returncode(self) -> int | None:
        return self._child.exitcode

    def poll(self) -> int | None:
        return self._child.exitcode

    def send_signal(self, sig: int) -> None:
        if self._child.exitcode is None:  # as Popen: never a signal to a pid that may have been reused
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self._child.exitcode is None:
            self._child.kill()

    def wait(self, timeout: float | None = None) -> int:
        self._child.join(timeout)
        if self._child.exitcode is None:
            self.kill()
            self._child.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._child.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        out, err = (Path(path).read_text(errors="replace") for path in (self._out, self._err))
        return out, err


def run(*args: str, cwd: Path | str | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)``, forked."""
    process = Process(*args, cwd=cwd)
    out, err = process.communicate(timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@atexit.register
def _kill_the_left() -> None:
    """A child a failed test left running is killed, not waited for by multiprocessing's own exit handler."""
    for child in multiprocessing.active_children():
        child.kill()
