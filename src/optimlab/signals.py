"""Stopping cleanly on SIGINT and SIGTERM: the run's callback that turns a signal into Lightning's
graceful shutdown at a safe point, the handlers, and the exit code a stopped run ends with."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import lightning as L

from optimlab.console import BarSafeHandler

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # a run's exit code when a stop signal ended it (128 + the signal)


class Interrupted(Exception):
    """The run was stopped by SIGINT or SIGTERM."""


class StopOnSignal(L.Callback):
    """SIGINT and SIGTERM raise KeyboardInterrupt, which Lightning turns into a graceful shutdown.
    Python drops an exception raised while a finalizer (``__del__``) runs, so the request is also
    remembered and raised again at the next batch. From the end of an epoch's training until its
    checkpoint is saved (the checkpoint callbacks' epoch-end hooks run after every other's) a signal
    is only remembered: a stop in between would leave the run's record holding an epoch that no
    checkpoint holds (so this callback must come before the run's record among the callbacks). So is a
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
def stop_signals_handled_by(handler: Any,
                            signums: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """``handler`` installed for ``signums`` (SIGINT and SIGTERM) inside the block; the previous handlers after it.
    ``signal.SIG_IGN`` ignores them there, and a process started there inherits that."""
    old = {s: signal.signal(s, handler) for s in signums}
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


def exit_code(stop: BaseException) -> int:
    """A run's exit code for ``stop``, a KeyboardInterrupt or :class:`Interrupted` naming its signal
    (:data:`EXIT_CODES`; SIGINT's when unnamed)."""
    return EXIT_CODES.get(stop.args[0] if stop.args else "SIGINT", EXIT_CODES["SIGINT"])


def interrupt(signum: int, frame: Any) -> None:
    """SIGINT or SIGTERM as a KeyboardInterrupt naming it."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def signal_of(stop: BaseException) -> int:
    """The stop signal behind ``stop``: a KeyboardInterrupt naming it, a run's exit (:data:`EXIT_CODES`),
    SIGTERM for anything else (an error, the generator closed)."""
    if isinstance(stop, SystemExit):
        return signal.SIGTERM if stop.code == EXIT_CODES["SIGTERM"] else signal.SIGINT
    if isinstance(stop, KeyboardInterrupt):
        return signal.SIGTERM if stop.args and stop.args[0] == "SIGTERM" else signal.SIGINT
    return signal.SIGTERM
