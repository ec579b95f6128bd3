"""A hyperparameter search (``hparams_search=optuna``: a Hydra sweeper other than the basic one):
its settings checked before its first trial, one line and exit 2 (Optuna's sweeper would end in a
traceback after its log lines, or loop for ever at ``n_jobs=0``)."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from optimlab.checks import is_integer, refusal
from optimlab.hydra_job import refuse
from optimlab.summary import OPTIMIZED_METRICS
from optimlab.validate import rule_error

DIRECTIONS = ("minimize", "maximize")


def is_search(sweeper: DictConfig) -> bool:
    """Whether ``hydra.sweeper`` searches (trials chosen from earlier results) rather than sweeps a grid."""
    return not str(sweeper.get("_target_", "")).endswith("BasicSweeper")


def one_direction(direction: Any) -> Any:
    """The direction Optuna's sweeper reads from ``direction``: its own enum's name, a list's one item (one
    objective); anything else as it is."""
    if isinstance(direction, Sequence) and not isinstance(direction, str) and len(direction) == 1:
        direction = direction[0]
    return direction.name if isinstance(direction, Enum) else direction


def search_error(cfg: DictConfig, sweeper: DictConfig) -> str | None:
    """Why a search cannot optimise ``optimized_metric`` with ``sweeper``'s settings (an unknown metric,
    a direction other than one of :data:`DIRECTIONS` or the metric's opposite, a count of trials or
    of parallel jobs below 1), or None."""
    metric, given = cfg.get("optimized_metric"), sweeper.get("direction")
    direction = one_direction(given)
    if error := rule_error("optimized_metric", metric):
        return error
    if "direction" in sweeper and direction not in DIRECTIONS:  # a run returns one metric: one direction
        shown = list(given) if isinstance(given, Sequence) and not isinstance(given, str) else given
        return refusal("hydra.sweeper.direction", shown, f"one of {', '.join(DIRECTIONS)} (a run returns one metric)")
    if direction is not None and direction != OPTIMIZED_METRICS[metric]:
        return (f"hydra.sweeper.direction: {direction!r} contradicts optimized_metric={metric} "
                f"(to {OPTIMIZED_METRICS[metric]}); set one of them to agree")
    for key in ("n_trials", "n_jobs"):
        if key in sweeper and not (is_integer(sweeper[key]) and sweeper[key] >= 1):
            return refusal(f"hydra.sweeper.{key}", sweeper[key], "an integer >= 1")
    return None


class CheckSearch(Callback):
    """A search whose settings cannot work (:func:`search_error`): refused before the sweeper starts.
    Registered in ``conf/config.yaml``'s ``hydra.callbacks``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_search(config.hydra.sweeper) and (error := search_error(config, config.hydra.sweeper)):
            refuse(error)
