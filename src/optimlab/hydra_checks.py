"""A Hydra callback that checks the output folder before Hydra creates it: a folder that cannot be
written (under a file, on a read-only disk, without permission) is one line and exit status 2, not
the traceback of Hydra's own ``mkdir``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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


class CheckOutputFolder(Callback):
    """Refuse a run or sweep whose ``hydra.run.dir`` / ``hydra.sweep.dir`` cannot be written."""

    @staticmethod
    def _check(key: str, folder: Any) -> None:
        reason = unwritable(Path(str(folder)).absolute())
        if reason:
            print(f"error: {key}: {str(folder)!r} cannot be written ({reason}); choose another folder", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)
