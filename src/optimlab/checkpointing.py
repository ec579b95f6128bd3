"""Checkpoints that survive a kill mid-write and never hold non-finite weights; finding and
checking the one to resume from."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from optimlab.files import atomic_write, read_error
from optimlab.summary import SUMMARY
from optimlab.validate import ConfigError

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written by :func:`~optimlab.files.atomic_write`: a kill at any moment leaves
    either the previous checkpoint or the new one, never half of one. A checkpoint whose weights
    are not all finite (the epoch a run diverged in) is not written: the previous one is kept, so
    every checkpoint on disk can be resumed or tested."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        weights = [t for t in checkpoint.get("state_dict", {}).values() if torch.is_tensor(t) and t.is_floating_point()]
        if not all(bool(torch.isfinite(t).all()) for t in weights):
            kept = "the previous checkpoint is kept" if Path(path).is_file() else "there is no earlier one"
            print(f"{path}: not written, the weights are not finite ({kept})", file=sys.stderr)
            return
        save = super().save_checkpoint
        atomic_write(Path(path), lambda tmp: save(checkpoint, tmp, storage_options))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The run's checkpoint of its last finished epoch, if it has one."""
    path = run_dir / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


def holds_a_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run a new one must not overwrite: a summary (readable or not) or a
    checkpoint."""
    return (run_dir / SUMMARY).exists() or last_checkpoint(run_dir) is not None


def resolve_resume(target: str | os.PathLike) -> tuple[Path, Path | None]:
    """(run dir, checkpoint) for ``resume=<run dir or .ckpt>``; the checkpoint is None when the run
    never finished an epoch (it then starts again from scratch in the same directory). Absolute: the
    checkpoint callback compares its folder with the one saved, and forgets the best epoch when they differ."""
    target = Path(os.path.abspath(target))
    if target.is_file():
        run_dir = target.parent.parent if target.parent.name == CHECKPOINT_DIR else target.parent
        return run_dir, target
    return target, last_checkpoint(target)


def read_checkpoint(path: Path, module: nn.Module) -> dict[str, Any]:
    """The checkpoint to resume from (what Lightning saved: ``global_step``, each callback's state, ...);
    before anything is written, a ConfigError where ``path`` is not a readable checkpoint of ``module``
    (a truncated or empty file, another file, another model's checkpoint)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"resume: {str(path)!r} cannot be read as a checkpoint ({read_error(err)}); "
                          "nothing was changed") from None
    saved = state.get("state_dict") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"resume: {str(path)!r} is not a checkpoint of an optimlab run; nothing was changed")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in saved.items() if torch.is_tensor(v)}
    if found != expected:
        key = next(iter(sorted(set(found) ^ set(expected)) or
                        [k for k in sorted(expected) if found.get(k) != expected[k]]))
        raise ConfigError(f"resume: {str(path)!r} holds another model's weights ({key}: "
                          f"{found.get(key, 'missing')} in the checkpoint, {expected.get(key, 'not in this model')} "
                          f"in the run's model); nothing was changed")
    return state
