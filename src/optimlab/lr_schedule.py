"""A run's learning-rate schedule replayed on a stand-in optimizer: the run's optimizer class and
options over one stand-in parameter, its group lr the run's, stepped by the run's own scheduler
config after each epoch as the run steps its real one. torch's scheduler code on the same values
gives the same floats, so a stand-in tells the lr a run had at any epoch without the run: what a
``callbacks.lr_monitor`` that logs once an epoch logged (:func:`epoch_start_lrs`) and, one stand-in
per member, a population's member-wise lrs (:mod:`optimlab.population.schedule`).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from optimlab.build import optimizer_class
from optimlab.checks import settings_outside

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


def lr_monitor_tag(cfg: DictConfig) -> str:
    """The tag a run's ``LearningRateMonitor`` logs its lr under: ``lr-`` and its optimizer's class name."""
    return f"lr-{optimizer_class(cfg.optimizer)[0].__name__}"


def epoch_start_lrs(cfg: DictConfig, epochs: int) -> list[float]:
    """The lr a run's optimizer has at the start of each of its first ``epochs`` epochs: set by its
    scheduler, stepped after every epoch as a run steps it, else the configured lr."""
    optimizer = stand_in(cfg)
    scheduler = stand_in_scheduler(cfg, optimizer) if cfg.get("scheduler") else None
    lrs = []
    with stepping_stand_ins():
        for _ in range(epochs):
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            if scheduler is not None:
                scheduler.step()
    return lrs


def lr_monitor_unfollowed(entry: Mapping[str, Any]) -> list[str]:
    """The settings (``key=value``) of this ``callbacks.lr_monitor`` entry that make it log more or other than
    what :func:`epoch_start_lrs` tells from a config, the optimizer's lr at the start of every epoch
    (``logging_interval: epoch``; not per step, nor momentum or weight decay); none: it logs just that."""
    followed = {"logging_interval": lambda v: v == "epoch", "log_momentum": operator.not_,
                "log_weight_decay": operator.not_}
    return settings_outside(entry, LR_MONITOR, followed)


def lr_monitor_followed(entry: Mapping[str, Any]) -> bool:
    """Whether this ``callbacks.lr_monitor`` entry logs what :func:`epoch_start_lrs` tells
    (:func:`lr_monitor_unfollowed`)."""
    return not lr_monitor_unfollowed(entry)
