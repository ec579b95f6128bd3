"""A hyperparameter search (``hparams_search=optuna``: a Hydra sweeper other than the basic one):
its settings checked before its first trial, one line and exit 2 (Optuna's sweeper would end in a
traceback after its log lines, or loop for ever at ``n_jobs=0``)."""

from __future__ import annotations

import functools
import math
import sys
import time
import warnings
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from optimlab.checks import is_integer, refusal
from optimlab.command_line import command_line_error, refuse
from optimlab.summary import FINISHED, OPTIMIZED_METRICS, SUMMARY, read_summary
from optimlab.validate import RULES, rule_error

DIRECTIONS = ("minimize", "maximize")


def is_search(sweeper: DictConfig) -> bool:
    """Whether ``hydra.sweeper`` searches (trials chosen from earlier results) rather than sweeps a grid."""
    return not str(sweeper.get("_target_", "")).endswith("BasicSweeper")


def searching() -> bool:
    """Whether the job Hydra runs now is a search's trial (a failed trial then scores the metric's worst value:
    a search ends at its first failed trial)."""
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and is_search(hydra_cfg.sweeper)


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


def search_space(sweeper: DictConfig, overrides: Sequence[str] = ()) -> dict[str, tuple[str, str]]:
    """The search's parameters, ``key -> (expression, where it was given)``: ``sweeper``'s ``params``, then the
    command line's ``overrides`` that sweep a key or give one of theirs, which replace them (as Optuna's sweeper
    takes them: ``lr=interval(0.01, 0.1)`` is a parameter as ``hydra.sweeper.params.lr`` is)."""
    space = {key: (str(expression), f"hydra.sweeper.params.{key}")
             for key, expression in (sweeper.get("params") or {}).items()}
    parser = OverridesParser.create()
    for line in overrides:
        try:
            override = parser.parse_override(line)
        except HydraException:  # (the command line's own check names it)
            continue
        key = override.key_or_group
        if override.is_delete():  # ~key: none of the search's parameters (Optuna's sweeper drops it too)
            space.pop(key, None)
        elif not key.startswith(("hydra.", "hydra/")) and (override.is_sweep_override() or key in space):
            space[key] = (line.split("=", 1)[1], key)
    return space


def search_space_error(sweeper: DictConfig, conf_dir: Path | None, overrides: Sequence[str] = ()) -> str | None:
    """Why the search space (:func:`search_space` of ``sweeper`` and the command line's ``overrides``:
    ``key: choice(...) | interval(...) | range(...) | value``) cannot work, or None: an expression Hydra
    cannot read; an interval or range Optuna refuses (empty, a log interval from 0 or below, a range's step
    not positive); an option the config group in ``conf_dir`` does not have (None: the command has other
    config folders, whose options Hydra's composition decides); a value a key's rule refuses (every trial
    that draws it would fail: an interval's bounds, a range's lowest and highest draw, each choice); an
    ``optimized_metric`` against the search's direction. (A trial whose config cannot be composed,
    command_line.composition_error refuses before Hydra starts.) What the rules cannot see (a constructor's
    own checks, a model's widths) fails its trial alone, which then scores the metric's worst value."""
    parser = OverridesParser.create()
    for key, (expression, where) in search_space(sweeper, overrides).items():
        try:
            override = parser.parse_override(f"{key}={expression}")
        except HydraException as err:
            return f"{where}: {expression!r} cannot be read ({str(err).strip().splitlines()[0]})"
        sweep = override.value()
        if isinstance(sweep, (IntervalSweep, RangeSweep)):
            low, high = (sweep.start, sweep.end) if isinstance(sweep, IntervalSweep) else (sweep.start, sweep.stop)
            if isinstance(sweep, RangeSweep) and not sweep.step > 0:
                return f"{where}: {expression!r} needs a step above 0"
            if low > high:
                return f"{where}: {expression!r} is empty: its start lies above its end"
            if "log" in sweep.tags and low <= 0:
                return f"{where}: {expression!r} is on a log scale, which needs a start above 0"
            if isinstance(sweep, RangeSweep):  # Optuna draws start, start + step, ... up to stop itself
                high = low + sweep.step * math.floor((high - low) / sweep.step)
            elif not (isinstance(low, int) and isinstance(high, int)) and high > low:
                high = math.nextafter(high, low)  # Optuna (2.x) draws a float interval's end excluded: [0.0, 1.0)
            values = [low, high]
        else:
            values = list(sweep.list) if isinstance(sweep, ChoiceSweep) else [sweep]
        if conf_dir is not None and (error := command_line_error([f"{key}={expression}"], conf_dir)):
            return where.removesuffix(key) + error
        for value in values if key in RULES else []:
            if error := rule_error(key, value):
                return f"{where}: {expression!r} can draw {value!r}, and {error}"
            if key == "optimized_metric" and (error := search_error(OmegaConf.create({key: value}), sweeper)):
                return f"{where}: {expression!r} can draw {value!r}, and {error}"
    return None


def one_line(err: Exception) -> str:
    """``err``'s type and message as one line (Hydra's instantiation error, whose message says what failed,
    without its type: it is two lines, and points at HYDRA_FULL_ERROR)."""
    lines = [line.strip().rstrip(":") for line in str(err).split(", set env var HYDRA_FULL_ERROR")[0].splitlines()]
    message = ": ".join(line for line in lines if line and not line.startswith(("(Background on this error",
                                                                                "full_key:")))
    if isinstance(err, InstantiationException) and message:
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def sqlite_file(storage: str) -> Path | None:
    """The file a ``sqlite:///<path>`` storage names (relative to the working folder), or None."""
    name = storage.removeprefix("sqlite:///").split("?")[0] if storage.startswith("sqlite:///") else ""
    return Path(name) if name and name != ":memory:" else None


def backend_error(sweeper: DictConfig) -> str | None:
    """Why the search's ``sampler`` cannot be made or its ``storage`` opened, or None: Optuna's sweeper
    ends there in Hydra's three lines (a class it cannot import) or a traceback (a database it cannot
    open: an unknown dialect, a folder that does not exist). Opening a storage creates it, as the sweeper
    would next; a sqlite file this check created for a storage it then could not open is removed. A sampler
    given as a partial (``_partial_: true``, the grid sampler's: the sweeper adds its search space) is
    checked for its class alone."""
    import optuna  # (the sweeper's own dependency: imported only for a search)
    from hydra.utils import instantiate

    if (sampler := sweeper.get("sampler")) is not None:
        try:
            with warnings.catch_warnings():  # e.g. a deprecated sampler's: the sweeper makes it again, and warns
                warnings.simplefilter("ignore")
                made = instantiate(sampler)
        except Exception as err:
            return f"hydra.sweeper.sampler: cannot be made ({one_line(err)})"
        cls = made.func if isinstance(made, functools.partial) else type(made)
        if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
            return refusal("hydra.sweeper.sampler._target_", sampler.get("_target_"),
                           "an Optuna sampler, e.g. optuna.samplers.TPESampler")
    if (storage := sweeper.get("storage")) is not None:
        file = sqlite_file(str(storage))
        new = file is not None and not file.exists()
        try:
            optuna.storages.get_storage(storage)
        except Exception as err:
            if new:
                file.unlink(missing_ok=True)
            return f"hydra.sweeper.storage: {storage!r} cannot be opened ({one_line(err)})"
    return None


def own_config_dir(config: DictConfig) -> Path | None:
    """The folder of the command's configs (``hydra.runtime.config_sources``' main one), or None where
    the command adds other config folders (``hydra.searchpath``, ``--config-dir``)."""
    sources = config.hydra.runtime.config_sources
    if any(source.provider not in ("hydra", "main", "schema") for source in sources):
        return None
    return next((Path(str(s.path)) for s in sources if s.provider == "main" and s.schema == "file"), None)


def no_trial_finished(sweep_dir: Path, since: float, stored: bool = False) -> str | None:
    """Why the trials this command ran in ``sweep_dir`` (summaries written since ``since``, a time.time(): a
    reused folder holds earlier ones) found nothing, or None: none finished (each refused or crashed; a failed
    trial scores the worst value and the search goes on, so the sweeper's "best parameters" are one of the
    failures, unless the study is ``stored`` and holds earlier sessions' trials)."""
    ran = sorted(p for p in sweep_dir.glob("*/") if (p / SUMMARY).is_file() and (p / SUMMARY).stat().st_mtime >= since)
    summaries = [s for s in map(read_summary, ran) if s]
    if not summaries or any(s.status in FINISHED for s in summaries):
        return None
    why = next((s.error.strip().splitlines()[0] for s in summaries if s.error and s.error.strip()), "no error recorded")
    best = "" if stored else ", so the best parameters above are not a result"
    return f"none of the {len(summaries)} trials finished{best} (each was refused or crashed; the first: {why})"


class CheckSearch(Callback):
    """A search whose settings (:func:`search_error`) or search space (:func:`search_space_error`) cannot
    work: refused before the sweeper starts; one in which no trial finished (:func:`no_trial_finished`) ends
    with that line and exit status 1, as a sweep with a failed job does. Registered in ``conf/config.yaml``'s
    ``hydra.callbacks``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 2  # a file system may round a file's time down to whole seconds
        sweeper = config.hydra.sweeper
        if is_search(sweeper) and (error := search_error(config, sweeper) or
                                   search_space_error(sweeper, own_config_dir(config), config.hydra.overrides.task) or
                                   backend_error(sweeper)):
            refuse(error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        # under resume=auto a finished trial is skipped, its summary not written again: any finished one counts
        since = -math.inf if config.get("resume") == "auto" else self.started
        if is_search(sweeper) and (error := no_trial_finished(Path(str(config.hydra.sweep.dir)), since,
                                                              stored=sweeper.get("storage") is not None)):
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
