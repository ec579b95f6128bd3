"""Learning-rate schedules in a population: every member's lr follows its own run's scheduler.

A single run steps its scheduler (``instantiate(cfg.scheduler)(optimizer)``) after each training
epoch (:class:`~optimlab.module.ClassifierModule`). A population's optimizer holds one lr per member,
which torch's schedulers cannot step. So each member gets its own scheduler, built on a stand-in of
its optimizer (:mod:`optimlab.lr_schedule`). The lr each scheduler sets, at construction (a warm-up's
first factor) and after every epoch, becomes the member's entry of the population's lr: the floats the
member's run computes, by torch's own scheduler code on the same values. A scheduler that also changes
other options of the optimizer (a cyclic momentum) cannot be followed member by member:
:func:`why_not_followed` tells the plan, which runs such a job alone.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from optimlab.lr_schedule import stand_in, stand_in_scheduler, stepping_stand_ins


def why_not_followed(cfg: DictConfig) -> str | None:
    """Why a population cannot follow ``cfg.scheduler`` member by member, from a stand-in's run of the job's
    epochs, or None: it changes optimizer options other than lr (when built or when stepped: a population
    shares them), or it fails, or its state does not pass through the population checkpoint's save and
    load (``torch.load(weights_only=True)``)."""
    optimizer = stand_in(cfg)
    before = copy.deepcopy({key: value for key, value in optimizer.param_groups[0].items() if key != "params"})
    try:
        scheduler = stand_in_scheduler(cfg, optimizer)
        with stepping_stand_ins():
            for _ in range(int(cfg.epochs)):
                scheduler.step()
    except Exception as err:  # e.g. a step that wants a metric: the job's own run meets the same error
        return f"a learning-rate scheduler that fails on a stand-in optimizer ({type(err).__name__}: {err})"
    group = optimizer.param_groups[0]
    changed = sorted(key for key, value in before.items() if key != "lr" and group.get(key) != value)
    if changed:
        return f"a learning-rate scheduler that changes {', '.join(changed)}"
    buffer = io.BytesIO()
    try:
        torch.save(scheduler.state_dict(), buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as err:
        return f"a learning-rate scheduler whose state a checkpoint cannot hold ({type(err).__name__}: {err})"
    return None


class MemberSchedules:
    """One scheduler per member, from the members' configs (each with ``optimizer`` and ``scheduler``),
    setting the population's member-wise lr tensor."""

    def __init__(self, configs: Sequence[DictConfig]) -> None:
        self.schedulers = [stand_in_scheduler(cfg) for cfg in configs]

    def lrs(self) -> list[float]:
        """Every member's lr as its scheduler has set it."""
        return [scheduler.optimizer.param_groups[0]["lr"] for scheduler in self.schedulers]

    def set(self, lr: Tensor) -> None:
        """Write the members' lrs into ``lr`` (the population's, one entry per member)."""
        lr.copy_(torch.tensor(self.lrs(), dtype=lr.dtype))

    def step(self, lr: Tensor) -> None:
        """Step every member's scheduler, as its run does after each epoch, then :meth:`set` ``lr``."""
        with stepping_stand_ins():
            for scheduler in self.schedulers:
                scheduler.step()
        self.set(lr)

    def state_dict(self) -> list[dict[str, Any]]:
        return [scheduler.state_dict() for scheduler in self.schedulers]

    def load_state_dict(self, states: Sequence[dict[str, Any]], lr: Tensor) -> None:
        """The schedulers' ``states``, and the members' current lrs from ``lr`` (the restored optimizer's)."""
        for scheduler, state, value in zip(self.schedulers, states, lr.tolist()):
            scheduler.load_state_dict(state)
            scheduler.optimizer.param_groups[0]["lr"] = value
