"""Checkpoints that survive a kill mid-write, and finding the one to resume from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from optimlab.files import atomic_write

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written by :func:`~optimlab.files.atomic_write`: a kill at any moment leaves
    either the previous checkpoint or the new one, never half of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        atomic_write(Path(path), lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint of its last finished epoch, if it has one."""
    path = run_dir / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


def resolve_resume(target: str | os.PathLike) -> tuple[Path, Path | None]:
    """(run dir, checkpoint) for ``resume=<run dir or .ckpt>``; the checkpoint is None when the run
    never finished an epoch (it then starts again from scratch in the same directory)."""
    target = Path(target)
    if target.is_file():
        run_dir = target.parent.parent if target.parent.name == CHECKPOINT_DIR else target.parent
        return run_dir, target
    return target, last_checkpoint(target)
