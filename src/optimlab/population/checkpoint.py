"""Population checkpoints: one file per population, written after every epoch, read by ``resume=auto``.

A population's checkpoint lives beside its members' job folders, in the sweep dir:
``<sweep dir>/.populations/<id>.ckpt``, where ``<id>`` is a digest of the members' folder names (in
member order), so the same sweep rerun with ``resume=auto`` regroups the same jobs into the same
population and finds it. Each member's ``summary.json`` names the file (``population.checkpoint``)
from the population's start (it exists once an epoch has finished) until every member has finished.
It holds the loop's state (:meth:`~optimlab.population.loop.PopulationLoop.state_dict`:
stacked weights, optimizer state, finite flags, divergence steps and reasons, step and epoch counts,
every member's records), the members' configs (to refuse another sweep's file), the
population's first-step and wall time. It is written with :func:`~optimlab.files.atomic_write` (a kill
at any moment leaves the previous epoch's file or this one) and removed once every member has finished.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from optimlab.files import atomic_write, read_error, remove_stale_temporaries
from optimlab.resume import comparable  # the configs compared: without the keys a resume may change

CHECKPOINTS = ".populations"
FORMAT = 2  # 2: linear weights in nn.Linear's [P, out, in] layout (1: [P, in, out])


def trained(config: dict[str, Any]) -> dict[str, Any]:
    """What of a member's config its training depends on: :func:`~optimlab.resume.comparable`, without the
    diagnosis thresholds (``regimes``), which judge the record only (a checkpoint written when they were
    not yet config keys still fits)."""
    config = comparable(config)
    config.pop("regimes", None)
    return config


class PopulationCheckpoint:
    """The checkpoint file of the population whose members run in ``run_dirs`` (in member order),
    with their resolved ``configs``."""

    def __init__(self, run_dirs: Sequence[Path], configs: Sequence[dict[str, Any]]) -> None:
        sweep_dir = Path(os.path.commonpath([str(d) for d in run_dirs]))
        if len(run_dirs) == 1:
            sweep_dir = sweep_dir.parent
        self.jobs = [os.path.relpath(d, sweep_dir) for d in run_dirs]
        digest = hashlib.sha256("\n".join(self.jobs).encode()).hexdigest()[:16]
        self.path = sweep_dir / CHECKPOINTS / f"{digest}.ckpt"
        self.configs = [trained(c) for c in configs]

    def save(self, loop_state: dict[str, Any], **extra: Any) -> None:
        """Write the checkpoint of a finished epoch: the loop's state and ``extra`` (plain values)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "jobs": self.jobs, "configs": self.configs, "loop": loop_state, **extra}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def load(self, device: torch.device) -> tuple[dict[str, Any] | None, str]:
        """(the saved state with its tensors on ``device``, or None; why not, if None): a missing,
        unreadable or foreign file (other jobs or configs) gives None, and the population starts over."""
        remove_stale_temporaries(self.path.parent, self.path.name)  # its own only: others' may be on other nodes
        if not self.path.is_file():
            return None, "no checkpoint"
        try:
            state = torch.load(self.path, map_location=device, weights_only=True)
        except Exception as err:
            return None, f"{self.path} cannot be read ({read_error(err)})"
        if not isinstance(state, dict) or state.get("jobs") != self.jobs:
            return None, f"{self.path} is not this population's checkpoint"
        if state.get("format") != FORMAT:
            return None, f"{self.path} has format {state.get('format')}; this version reads format {FORMAT}"
        # Through today's comparable(): a file written when fewer keys were ignored still fits.
        configs = [trained(c) if isinstance(c, dict) else c for c in state.get("configs") or []]
        if configs != self.configs:
            return None, f"{self.path} was written for other configs of these jobs"
        return state, ""

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
