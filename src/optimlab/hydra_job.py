"""A run's dealings with Hydra's job folder: its name in a sweep (the overrides, shortened to what a
file system takes), checking it can be written before Hydra creates it (a folder under a file, on a
read-only disk, without permission: one line and exit status 2, not the traceback of Hydra's own
``mkdir``), and writing Hydra's record of the job once the run is accepted."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


# A sweep job's folder is ``<job number>_<overrides>``; most file systems take names of at most 255
# bytes, and a sweep with many overrides exceeds that (Hydra's mkdir then fails with a traceback).
DIRNAME_BYTES = 200


def job_dirname(overrides: str, limit: int = DIRNAME_BYTES) -> str:
    """``overrides`` (Hydra's ``hydra.job.override_dirname``) as it is when at most ``limit`` bytes in
    UTF-8; else cut to fit and ended by ``~`` and 8 hex digits of its SHA-1, so that jobs whose
    overrides differ only past the cut still get different, and stable, names."""
    encoded = overrides.encode()
    if len(encoded) <= limit:
        return overrides
    digest = hashlib.sha1(encoded).hexdigest()[:8]
    head = encoded[:limit - len(digest) - 1].decode(errors="ignore")  # a cut inside a character drops it
    return f"{head}~{digest}"


# conf/config.yaml: hydra.sweep.subdir: ${hydra.job.num}_${optimlab.dirname:${hydra.job.override_dirname}}
OmegaConf.register_new_resolver("optimlab.dirname", job_dirname, replace=True)


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
