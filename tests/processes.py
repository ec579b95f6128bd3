"""``python <args>`` as a process of its own (its own pid, signals, exit status and output), forked
from a server that has imported what train.py imports instead of started afresh: a new interpreter
spends about 6 s of CPU importing torch, Lightning and Hydra (AMD EPYC, 2 cores), and the tests that
signal, kill or patch a run start two dozen of them. The server imports and does nothing else, so
a child starts from a fresh interpreter's state. One difference: a child exits without the
interpreter's exit handlers, as a killed run does (a run's records never wait for them).
What measures a fresh interpreter (its imports, its heap) still starts one with ``subprocess``."""

from __future__ import annotations

import multiprocessing
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
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        with open(path, "wb") as file:
            os.dup2(file.fileno(), fd)
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(args)
        sys.path.insert(0, str(Path(args[0]).resolve().parent))  # as python does for a script
        runpy.run_path(args[0], run_name="__main__")


class Process:
    """What the tests use of :class:`subprocess.Popen` (text output, read at the end)."""

    def __init__(self, *args: str, cwd: Path | str | None = None) -> None:
        self.args = [sys.executable, *args]
        self._output = tempfile.TemporaryDirectory(prefix="process-")
        self._out, self._err = (os.path.join(self._output.name, name) for name in ("out", "err"))
        self._child = SERVER.Process(target=_run_python, args=(list(args), str(Path(cwd or os.getcwd()).resolve()), dict(os.environ),
                                                                self._out, self._err))
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

    def wait(self, timeout: float | None = None) -> int:
        self._child.join(timeout)
        if self._child.exitcode is None:
            self._child.kill()
            self._child.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._child.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        output = tuple(Path(path).read_text(errors="replace") for path in (self._out, self._err))
        self._output.cleanup()
        return output


def run(*args: str, cwd: Path | str | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)``, forked."""
    process = Process(*args, cwd=cwd)
    out, err = process.communicate(timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
