"""Files: writing one so that a kill at any moment leaves the old version or the new one, never half;
whether a folder can be written; a folder held by one process at a time; why one could not be read."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: folders are not locked
    fcntl = None  # type: ignore[assignment]

TEMPORARY = re.compile(r"\.(.+)\.tmp(\d+)")  # atomic_write's temporary file for <name>, by process <pid>


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, then rename it over
    ``path``. On any failure the temporary file is removed and ``path`` is left as it was."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # matches TEMPORARY
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


PROBE_WAITS = 5  # tries 10 ms apart before a folder counts as held by another process


def lock(folder: Path, shared: bool = False, tries: int = 1) -> int | None:
    """A lock on ``folder`` (exclusive, or ``shared``), which closing the returned descriptor releases, and the
    system when the process ends, also when it is killed: the descriptor; -1 where the system or the file system
    has no locks (or the folder may not be read); None where another process's lock stands in the way after
    ``tries`` tries 10 ms apart (nothing is held then)."""
    if fcntl is None:
        return -1
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder this process may write but not read: not locked
        return -1
    for attempt in range(tries):
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return descriptor
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.01)  # a probe's lock (held_elsewhere) goes at once; a holder's stays
        except OSError:  # e.g. a network file system without locks
            return descriptor
    os.close(descriptor)
    return None


def hold(folder: Path) -> int | None:
    """Lock ``folder`` for this process alone (:func:`lock`, exclusive, waiting out a probe's lock)."""
    return lock(folder, tries=PROBE_WAITS + 1)


HELD: set[Path] = set()  # the folders this process holds (two locks of one folder would conflict)


@contextlib.contextmanager
def held(folder: Path) -> Iterator[bool]:
    """Hold ``folder`` for the block (:func:`hold`): yields whether this process holds it (False: another
    process does, and the caller refuses). A folder this process holds already stays held as it is (a
    population sweep's job that runs in its sweep folder)."""
    folder = Path(os.path.abspath(folder))
    if folder in HELD:
        yield True
        return
    descriptor = hold(folder)
    if descriptor is None:
        yield False
        return
    HELD.add(folder)
    try:
        yield True
    finally:
        HELD.discard(folder)
        if descriptor >= 0:
            os.close(descriptor)


def held_elsewhere(folder: Path) -> bool:
    """Whether another process holds ``folder`` now (a folder that does not exist is held by none). The probe is
    a shared lock, taken and given back at once: two processes probing one folder at the same moment do not
    see each other as its holder."""
    folder = Path(os.path.abspath(folder))
    if folder in HELD or not folder.is_dir():
        return False
    descriptor = lock(folder, shared=True)
    if descriptor is not None and descriptor >= 0:
        os.close(descriptor)
    return descriptor is None


def read_error(err: BaseException) -> str:
    """Why something failed (reading a checkpoint, importing a module, a download), in one line: the error's
    type and its message's first line."""
    message = str(err)
    return f"{type(err).__name__}: {message.splitlines()[0] if message else 'empty'}"


def written_file(err: OSError) -> str:
    """The file a failed write was for: the destination of a failed move (a library may write to a
    temporary file elsewhere first), without :func:`atomic_write`'s temporary name."""
    name = str(err.filename2 or err.filename or "the run's files")
    match = TEMPORARY.fullmatch(Path(name).name)
    return str(Path(name).with_name(match.group(1))) if match else name


def remove_stale_temporaries(folder: Path, name: str | None = None) -> None:
    """Delete what :func:`atomic_write` leaves when a kill lands mid-write (``.<name>.tmp<pid>``; only
    ``name``'s when given), and a folder so named (files made apart to be moved in together: the report's);
    called by a run that owns ``folder``, before it writes there. What a process of this machine that is
    still running made stays: it may be writing it now (a second sweep in the same folder), and removing it
    would fail that process's rename."""
    if folder.is_dir():
        for path in folder.iterdir():
            match = TEMPORARY.fullmatch(path.name)
            if match and (name is None or match.group(1) == name) and not running(int(match.group(2))):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def running(pid: int) -> bool:
    """Whether another process with this id runs on this machine (this process writes nothing now)."""
    if pid <= 0 or pid == os.getpid():  # kill(0) would ask about the process group
        return False
    try:
        os.kill(pid, 0)  # signal 0: only whether it exists
    except (ProcessLookupError, OverflowError):  # none such; larger than any process id
        return False
    except PermissionError:  # another user's
        return True
    return True


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written, or None when it can."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
