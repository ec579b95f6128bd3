"""Learning-rate schedules in a population: every member's lr follows its own run's scheduler.

A single run steps its scheduler (``instantiate(cfg.scheduler)(optimizer)``) after each training
epoch (:class:`~optimlab.module.ClassifierModule`). A population's optimizer holds one lr per member,
which torch's schedulers cannot step. So each member gets its own scheduler, built from its config on
a stand-in optimizer (the member's optimizer class and options over one stand-in parameter: its group
lr is the member's). The lr each scheduler sets, at construction (a warm-up's first factor) and after
every epoch, becomes the member's entry of the population's lr: the floats the member's run computes,
by torch's own scheduler code on the same values. A scheduler that also changes other options of the
optimizer (a cyclic momentum) cannot be followed member by member: :func:`why_not_followed` tells
the plan, which runs such a job alone. A run's ``callbacks.lr_monitor`` logs the lr each epoch starts
with; :func:`epoch_start_lrs` gives a member's from its config, the same way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from optimlab.build import optimizer_class

# torch's warning for a scheduler stepped before its optimizer ever stepped: a stand-in never steps.
STEP_ORDER = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"
LR_MONITOR = "lightning.pytorch.callbacks.LearningRateMonitor"


def stand_in(cfg: DictConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over one stand-in parameter."""
    cls, options = optimizer_class(cfg.optimizer)
    return cls([torch.zeros(1)], **options)


def stand_in_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """``cfg.scheduler`` built on ``optimizer`` (default: a :func:`stand_in` of ``cfg.optimizer``)."""
    return instantiate(cfg.scheduler)(optimizer or stand_in(cfg))


@contextlib.contextmanager
def stepping_stand_ins() -> Iterator[None]:
    """A block that steps stand-ins' schedulers, without torch's warning that their optimizers never stepped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=STEP_ORDER)
        yield


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


def lr_monitor_followed(entry: Mapping[str, Any]) -> bool:
    """Whether a population's member can log what this ``callbacks.lr_monitor`` entry logs for its run:
    the optimizer's lr at the start of every epoch (``logging_interval: epoch``; not per step, nor
    momentum or weight decay), which :func:`epoch_start_lrs` gives from the member's config."""
    logs_more = any(entry.get(key) for key in ("log_momentum", "log_weight_decay"))
    return entry.get("_target_") == LR_MONITOR and not logs_more and entry.get("logging_interval") == "epoch" \
        and set(entry) <= {"_target_", "logging_interval", "log_momentum", "log_weight_decay"}


def epoch_start_lrs(cfg: DictConfig, epochs: int) -> tuple[str, list[float]]:
    """The tag a run's ``LearningRateMonitor`` logs under (``lr-`` and its optimizer's class name) and
    the lr its optimizer has at the start of each of its first ``epochs`` epochs: set by its scheduler,
    stepped after every epoch as a run steps it (the same computation on a stand-in as the population's),
    else the configured lr."""
    optimizer = stand_in(cfg)
    scheduler = stand_in_scheduler(cfg, optimizer) if cfg.get("scheduler") else None
    lrs = []
    with stepping_stand_ins():
        for _ in range(epochs):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            if scheduler is not None:
                scheduler.step()
    return f"lr-{type(optimizer).__name__}", lrs


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
