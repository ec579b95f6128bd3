"""A run's dealings with Hydra's job folder: checking it can be written before Hydra creates it (a
folder under a file, on a read-only disk, without permission: one line and exit status 2, not the
traceback of Hydra's own ``mkdir``), and writing Hydra's record of the job once the run is accepted."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


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


def save_job_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's record of the job (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``) in
    ``run_dir``. Hydra's ``run_job`` writes it before the task runs unless ``hydra.output_subdir`` is
    null, as in this project's config: then a run writes it once it owns its folder, so that a refused
    run cannot overwrite another run's record. A no-op outside a Hydra job or when Hydra wrote it."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")
