"""Early stopping in a population: each member stops where Lightning's EarlyStopping stops its run.

A run with ``callbacks=early_stopping`` gets ``lightning.pytorch.callbacks.EarlyStopping(monitor, mode,
patience, min_delta)``, which, after each epoch's validation, compares the monitored value (``val/loss``
or ``val/acc``) with the best so far: an improvement (by more than ``min_delta``) resets its count of
epochs without one, and the run stops once that count reaches ``patience``, or at once when the value is
not finite. :class:`MemberEarlyStopping` keeps that state for every member and makes the same decision
from the member's own validation value, in the dtype the run compares it in (``val/acc``: float64;
``val/loss``: the training dtype, summed as the run's SampleMean sums it); a member that stops is frozen
(its training ends, its weights stay), and its record is a complete run of fewer epochs, as its run's is.
Only those four settings are followed: an ``early_stopping`` entry with other keys runs its job alone
(:func:`unfollowed`). Members may differ in them, and in whether they stop early at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from optimlab.checks import settings_outside

EARLY_STOPPING = "lightning.pytorch.callbacks.EarlyStopping"
SETTINGS = ("monitor", "mode", "patience", "min_delta")
# the monitor -> the loop's epoch value it is (PopulationLoop.finish_epoch)
MONITOR_COLUMNS = {"val/loss": "val_loss_run", "val/acc": "val_acc"}


def unfollowed(entry: Mapping[str, Any]) -> list[str]:
    """The settings (``key=value``) of this ``callbacks.early_stopping`` entry a population cannot follow
    member by member; none: it can."""
    return settings_outside(entry, EARLY_STOPPING, {"monitor": MONITOR_COLUMNS.__contains__}, SETTINGS)


class StopRule(NamedTuple):
    """One member's early-stopping settings, as its run's EarlyStopping applies them."""

    key: str  # the loop's epoch value it monitors (MONITOR_COLUMNS)
    mode: str
    patience: int
    min_delta: float  # signed as Lightning signs it
    dtype: torch.dtype  # the dtype the run compares in (val/loss: the training dtype; val/acc: float64)

    @classmethod
    def of(cls, monitor: str, mode: str, patience: int, min_delta: float = 0.0,
           dtype: torch.dtype = torch.float32) -> StopRule:
        """``dtype``: the training dtype."""
        return cls(MONITOR_COLUMNS[monitor], mode, patience, min_delta if mode == "max" else -min_delta,
                   dtype if monitor == "val/loss" else torch.float64)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], dtype: torch.dtype) -> StopRule:
        """For a ``callbacks.early_stopping`` entry with no :func:`unfollowed` setting; the settings it leaves
        out take EarlyStopping's defaults (mode min, patience 3, min_delta 0)."""
        return cls.of(entry["monitor"], entry.get("mode", "min"), int(entry.get("patience", 3)),
                      float(entry.get("min_delta", 0.0)), dtype)


class MemberEarlyStopping:
    """Every member's early stopping: its rule (None: its run has none) and its state (the best monitored
    value and the epochs since it improved)."""

    def __init__(self, rules: Sequence[StopRule | None]) -> None:
        self.rules = list(rules)
        self.best = [-math.inf if rule is not None and rule.mode == "max" else math.inf for rule in self.rules]
        self.wait = [0] * len(self.rules)

    @classmethod
    def from_entries(cls, entries: Sequence[Mapping[str, Any] | None],
                     dtype: torch.dtype) -> MemberEarlyStopping | None:
        """From the members' ``callbacks.early_stopping`` entries (None or empty: none); None when no member
        has one."""
        if not any(entries):
            return None
        return cls([StopRule.from_entry(entry, dtype) if entry else None for entry in entries])

    def stops(self, m: int, epoch: Mapping[str, Sequence[float]]) -> bool:
        """Member m's decision after an epoch whose values (the loop's, per member, by column) are ``epoch``:
        True when it stops there; never for a member without early stopping."""
        rule = self.rules[m]
        if rule is None:
            return False
        current = epoch[rule.key][m]
        value = torch.tensor(current, dtype=rule.dtype)
        if not torch.isfinite(value):
            return True
        shifted, best = value - rule.min_delta, torch.tensor(self.best[m], dtype=rule.dtype)
        if shifted > best if rule.mode == "max" else shifted < best:
            self.best[m], self.wait[m] = current, 0
            return False
        self.wait[m] += 1
        return self.wait[m] >= rule.patience

    def state_dict(self) -> dict[str, list]:
        return {"best": list(self.best), "wait": list(self.wait)}

    def load_state_dict(self, state: Mapping[str, list]) -> None:
        self.best, self.wait = list(state["best"]), list(state["wait"])
