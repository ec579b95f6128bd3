"""Learning-rate schedules in a population: every member's lr follows its own run's scheduler.

A single run steps its scheduler (``instantiate(cfg.scheduler)(optimizer)``) after each training
epoch (:class:`~optimlab.module.ClassifierModule`). A population's optimizer holds one lr per member,
which torch's schedulers cannot step. So each member gets its own scheduler, built from its config on
a stand-in optimizer (the member's optimizer class and options over one stand-in parameter: its group
lr is the member's). The lr each scheduler sets, at construction (a warm-up's first factor) and after
every epoch, becomes the member's entry of the population's lr: the floats the member's run computes,
by torch's own scheduler code on the same values. A scheduler that also changes other options of the
optimizer (a cyclic momentum) cannot be followed member by member: :func:`options_it_changes` tells
the plan, which runs such a job alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from optimlab.build import optimizer_class

# torch's warning for a scheduler stepped before its optimizer ever stepped: a stand-in never steps.
STEP_ORDER = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"


def stand_in_scheduler(cfg: DictConfig) -> Any:
    """``cfg.scheduler`` built on a stand-in of ``cfg.optimizer`` (see the module docstring)."""
    cls, options = optimizer_class(cfg.optimizer)
    return instantiate(cfg.scheduler)(cls([torch.zeros(1)], **options))


def options_it_changes(cfg: DictConfig) -> list[str]:
    """The optimizer options other than lr that ``cfg.scheduler`` changes over the run's epochs."""
    scheduler = stand_in_scheduler(cfg)
    group = scheduler.optimizer.param_groups[0]
    before = {key: value for key, value in group.items() if key not in ("params", "lr", "initial_lr")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=STEP_ORDER)
        for _ in range(int(cfg.epochs)):
            scheduler.step()
    return sorted(key for key, value in before.items() if group[key] != value)


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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=STEP_ORDER)
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
