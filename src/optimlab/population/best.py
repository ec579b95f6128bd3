"""The best epoch in a population: each member's best checkpoint, chosen as ModelCheckpoint chooses its run's.

A run's ``callbacks.model_checkpoint`` (Lightning's ``ModelCheckpoint`` with a ``monitor`` and
``save_top_k: 1``) considers saving after each epoch's validation: not when the run has taken no step since
its last save (Lightning compares global steps), always the first time, and after that when the monitored
value is strictly better than the saved one (a NaN is kept as the worst value, so anything finite beats it).
A save of non-finite weights is not written (:class:`~optimlab.checkpointing.AtomicCheckpointIO`): the file
keeps the previous best weights, though the value counts as saved. With ``test_ckpt=best`` the run is
tested with the weights in that file (its last weights when none was ever written). :class:`MemberBest`
makes the same choices for every member from its own validation value (the value its run logs: ``val/loss``
in the training dtype, ``val/acc`` in float64; compared as they are, with no arithmetic that could round
otherwise), and keeps the weights the file would hold: the
run's (a member updated into non-finite weights holds those, so they are not kept). Only entries whose
settings leave the choice as described are followed (:func:`followed`); a job with another one runs alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from optimlab.divergence import all_finite
from optimlab.population.stopping import MONITOR_COLUMNS

MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
# Settings that leave which epoch the best checkpoint holds as described (where and how it is written,
# a last.ckpt beside it, when in the epoch it is saved: after the validation either way).
# Not a set ``dirpath`` (a folder runs may share), and only a ``filename`` without placeholders: a templated one
# gives each save a file of its own, and the earlier best's is deleted even when the new one is refused.
NEUTRAL = {"_target_", "filename", "monitor", "mode", "save_top_k", "save_last", "save_on_train_epoch_end",
           "auto_insert_metric_name", "enable_version_counter", "verbose", "save_weights_only", "every_n_epochs"}


def followed(entry: Mapping[str, Any]) -> bool:
    """Whether a population can choose its members' best epochs as this ``callbacks.model_checkpoint``
    entry chooses its runs' (one best checkpoint, considered after every epoch; or no ``monitor``, and
    then no best: the runs are tested with their last weights)."""
    entry = {key: value for key, value in entry.items() if not (key == "dirpath" and value is None)}
    return entry.get("_target_") == MODEL_CHECKPOINT and set(entry) <= NEUTRAL \
        and entry.get("monitor") in (None, *MONITOR_COLUMNS) and entry.get("save_top_k", 1) == 1 \
        and entry.get("every_n_epochs") in (None, 1) and isinstance(entry.get("filename"), str) \
        and "{" not in entry["filename"]


class MemberBest:
    """Every member's best checkpoint: its monitored value, the steps taken since it was saved and its weights."""

    def __init__(self, members: int, monitor: str, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"callbacks.model_checkpoint.mode: {mode!r}; expected min or max")
        self.key, self.mode = MONITOR_COLUMNS[monitor], mode
        self.saved: list[float | None] = [None] * members  # the value of each member's best checkpoint
        self.unsaved_steps = [0] * members  # the steps each member took since its last save
        self.weights: dict[int, list[Tensor]] = {}  # member -> the weights of its best checkpoint

    def update(self, m: int, current: float, steps: int, weights: Sequence[Tensor]) -> None:
        """After an epoch in which member m took ``steps`` steps and validated to ``current``: save a
        copy of ``weights`` (member m's, as its run holds them) as its best when its run would (the value
        alone where they are not all finite)."""
        self.unsaved_steps[m] += steps
        if not self.unsaved_steps[m]:
            return
        saved = self.saved[m]
        if saved is not None and not (current < saved if self.mode == "min" else current > saved):
            return
        self.saved[m] = (math.inf if self.mode == "min" else -math.inf) if math.isnan(current) else current
        self.unsaved_steps[m] = 0
        if all_finite(list(weights)):  # one host read
            self.weights[m] = [w.detach().clone() for w in weights]

    def state_dict(self) -> dict[str, Any]:
        """The values, step counts and weights of every member's best checkpoint (for the population's)."""
        return {"saved": list(self.saved), "unsaved_steps": list(self.unsaved_steps), "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state``."""
        self.saved, self.unsaved_steps = list(state["saved"]), list(state["unsaved_steps"])
        self.weights = {int(m): list(w) for m, w in state["weights"].items()}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], members: int) -> MemberBest | None:
        """The state for a followed ``callbacks.model_checkpoint`` entry; None when it has no ``monitor``."""
        if not followed(entry):
            raise ValueError(f"a population cannot follow this callbacks.model_checkpoint entry: {dict(entry)}")
        monitor = entry.get("monitor")
        return None if monitor is None else cls(members, monitor, entry.get("mode", "min"))
