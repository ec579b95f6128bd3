"""A run as the report sees it: its row (from its summary.json, optionally rediagnosed), and the
settings that name it (its optimizer *setting*, what differs from runs of the same experiment)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from optimlab.regimes import Thresholds, check_history
from optimlab.summary import COLLECTIONS, FINISHED, SUMMARY, config_key, describe_run, diagnose_run, read_summary


ERROR_CHARS = 160  # of a crashed run's error (its first line) in the tables; the whole one is in its summary.json


def find_runs(sweep_dir: Path) -> list[Path]:
    """Every run directory under ``sweep_dir``: those with a summary.json, and Hydra job dirs (holding
    ``.hydra/``) whose job died before writing one; a symbolic link to such a folder counts as one (a job's
    folder kept elsewhere), a link to any other folder is not followed (it may lead to other sweeps)."""
    dirs = set()
    for folder, subfolders, _ in os.walk(sweep_dir):  # (os.walk lists a linked folder, and does not enter it)
        linked = [Path(folder, name) for name in subfolders if os.path.islink(os.path.join(folder, name))]
        dirs.update(d for d in (Path(folder), *linked) if (d / SUMMARY).is_file() or (d / ".hydra").is_dir())
    return sorted(dirs, key=lambda d: (_job_number(d.name), str(d)))


def _job_number(name: str) -> float:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else math.inf


class UnreadableRecord(ValueError):
    """A run's record that the report cannot read as a run's (its one line names the file and why)."""


# The label of a run whose record stops mid-run (its summary's status still ``running``): its job is still
# running, or was killed (SIGKILL, a power cut); the report cannot tell which.
UNFINISHED = "unfinished"
# The label of a run whose summary is there but cannot be read as one (cut short, edited, of another program):
# the report cannot tell how it ended, so it is not counted as crashed.
UNREADABLE = "unreadable"


def row_for(run_dir: Path, root: Path, rediagnose: bool = False) -> dict[str, Any]:
    """One report row. ``rediagnose``: label a finished run with the current rules (and the thresholds in
    its config) instead of the label its summary recorded; a finished run whose summary has no label
    gets one so too."""
    s = read_summary(run_dir)
    rel = str(run_dir.relative_to(root)) if run_dir != root else "."
    if s is None:
        there = (run_dir / SUMMARY).exists()
        label, why = (UNREADABLE, f"{SUMMARY} unreadable") if there else \
            ("crashed", f"no {SUMMARY} (the job ended before writing one)")
        return {"run": rel, "status": label, "regime": label, "epochs": 0, "history": [], "error": why,
                **job_coordinates(run_dir)}
    history, run, config = s.epochs, s.run, plain_numbers(s.config)

    def best(key: str) -> float | None:
        values = [r[key] for r in history if isinstance(r.get(key), (int, float))]
        return max(values) if values else None

    regime = s.regime
    if s.status in FINISHED and (rediagnose or regime is None):  # (an unfinished run's row shows its status)
        try:  # (a summary edited by hand, or of another version: thresholds or rows the rules cannot read)
            thresholds = Thresholds.from_overrides(s.config.get("regimes"))
            check_history(history)
        except (TypeError, ValueError) as err:
            raise UnreadableRecord(f"{run_dir / SUMMARY}: {err}") from None
        regime = diagnose_run(s.config, history, s.diverged, s.diverged_at_step, s.curvature, s.train_size,
                              thresholds).regime
    return {
        "run": rel, "name": run.name, "model": run.model, "optimizer": run.optimizer, "lr": run.lr,
        "widths": run.widths, "seed": run.seed, "data_seed": run.data_seed, "params": s.params,
        "final_train_acc": history[-1].get("train_acc") if history else None, "best_train_acc": best("train_acc"),
        "final_val_acc": history[-1].get("val_acc") if history else None, "best_val_acc": best("val_acc"),
        "final_test_acc": s.test_acc, "best_test_acc": best("test_acc"), "epochs": len(history),
        "regime": regime if s.status in FINISHED else UNFINISHED if s.status == "running" else s.status,
        "stopped_non_finite": s.diverged, "status": s.status, "wall_time_s": s.wall_time_s,
        "steps_per_s": s.steps_per_s, "history": history, "same_but_seed": same_but_seed(config),
        "settings": flat_settings(config),
        "curvature": s.curvature, "diverged_at_step": s.diverged_at_step,
        "sharpness_max": (s.curvature or {}).get("sharpness_max"),
        "sharpness_crossed_at_step": (s.curvature or {}).get("first_crossing_step"),
        "error": s.error.strip().splitlines()[0][:ERROR_CHARS] if s.error and s.error.strip() else None,
    }


def job_coordinates(run_dir: Path) -> dict[str, Any]:
    """Where a run without a readable summary lies in its sweep (its name, model, optimizer, lr, widths and
    seed, and its settings), from Hydra's record of its job (``.hydra/config.yaml``); nothing where that
    cannot be read either. Its map cell and table rows then show it."""
    from omegaconf import OmegaConf

    try:
        recorded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        config = plain_numbers(OmegaConf.to_container(recorded, resolve=True))
    except Exception:  # no record, or one that resolves only inside Hydra
        return {}
    if not isinstance(config, dict):
        return {}
    run = describe_run(config)
    return {"name": run.name, "model": run.model, "optimizer": run.optimizer, "lr": run.lr, "widths": run.widths,
            "seed": run.seed, "same_but_seed": same_but_seed(config), "settings": flat_settings(config)}


# Lightning reads these as a fraction when a float (1.0: all batches) and as a count when an int (1: one batch).
COUNT_OR_FRACTION = ("trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches",
                     "trainer.overfit_batches", "trainer.val_check_interval")


def plain_numbers(node: Any, key: str = "") -> Any:
    """``node`` with each whole float written as an int (up to 2**53: 1e300 stays 1e300; not under
    :data:`COUNT_OR_FRACTION`): ``weight_decay=0`` from a command line and ``0.0`` from a yaml are one
    setting (the map's cells and the seed table group by the settings' text)."""
    if isinstance(node, dict):
        return {name: plain_numbers(value, f"{key}.{name}" if key else str(name)) for name, value in node.items()}
    if isinstance(node, list):
        return [plain_numbers(value, key) for value in node]
    whole = isinstance(node, float) and node.is_integer() and abs(node) < 2 ** 53
    return int(node) if whole and key not in COUNT_OR_FRACTION else node


# Keys that may differ between runs that are otherwise the same experiment: the seed (and the data
# module's copy of it) and where and how a run was launched (the population launcher's plan included).
NOT_THE_EXPERIMENT = ("seed", "data.seed", "resume", "data.root", "trainer.progress_bar", "trainer.num_threads",
                      "population", "logger", "callbacks.progress_bar", "callbacks.lr_monitor")  # (what it logs, shows)


def same_but_seed(config: dict[str, Any]) -> str:
    """The run's whole config except :data:`NOT_THE_EXPERIMENT`, as a key: runs with equal keys
    differ only in their seed."""
    return config_key(config, NOT_THE_EXPERIMENT)


# Config groups a run may choose to leave out (conf/<group>/none.yaml, empty: the key holds {}): the choice none.
OPTIONAL_GROUPS = ("scheduler",)
# What a map's axes vary: the learning rate and the widths (the optimizer class is its panels); and the
# run's name, a label (experiments differing in lr alone are one setting).
MAP_AXES = ("name", "lr", "optimizer.lr", "optimizer._target_", "optimizer.impl", "model.hidden", "model.channels")


def flat_settings(config: dict[str, Any]) -> dict[str, str]:
    """The run's config as dotted keys and their values (as text), without :data:`NOT_THE_EXPERIMENT`
    and :data:`MAP_AXES`. A node built from a ``_target_`` is also its class's name (``scheduler=CosineAnnealingLR``
    against another run's ``scheduler=none``, :data:`OPTIONAL_GROUPS`), and ``callbacks`` and ``logger`` are also
    the names of their entries (``callbacks=early_stopping+model_checkpoint``): a group's choice is a setting even
    where the keys under it are only some runs'."""
    skipped = (*NOT_THE_EXPERIMENT, *MAP_AXES)
    flat: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = prefix + str(key)
            if dotted in skipped or key == "_target_":
                continue
            if isinstance(value, dict):
                if dotted in COLLECTIONS:
                    flat[dotted] = "+".join(sorted(name for name, entry in value.items()
                                                   if entry and f"{dotted}.{name}" not in skipped)) or "none"
                elif "_target_" in value:
                    flat[dotted] = str(value["_target_"]).rsplit(".", 1)[-1]
                walk(value, dotted + ".")
            elif dotted in COLLECTIONS:  # null: none, as {}
                flat[dotted] = "none"
            else:
                flat[dotted] = value if isinstance(value, str) else json.dumps(value)

    walk(config, "")
    for group in OPTIONAL_GROUPS:
        if not config.get(group):  # null, or {} (a group option whose file is empty)
            flat[group] = "none"
    return flat


def name_settings(rows: list[dict[str, Any]]) -> None:
    """Give each run its ``setting``: its optimizer, and the settings in which it differs from the
    sweep's other runs of that optimizer apart from the map's axes and the seed, e.g. ``sgd
    (optimizer.weight_decay=3)``. Runs of one setting differ only in lr, widths and seed: the map's
    cells, columns and lines are per setting, so that a swept weight decay is not taken for seeds.
    A key some runs lack (recorded by a version before it existed) differs only where the runs that
    have it differ."""
    by_optimizer: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("optimizer"):
            by_optimizer[r["optimizer"]].append(r)
    for optimizer, runs in by_optimizer.items():
        keys = sorted({key for r in runs for key in r["settings"]}, key=lambda k: (k.count("."), k))
        varying: list[str] = []
        for key in keys:
            values = [r["settings"].get(key) for r in runs]
            # A key that varies as one named already does says nothing more (batch_size and its data.batch_size).
            if len({v for v in values if v is not None}) > 1 and \
                    all(values != [r["settings"].get(kept) for r in runs] for kept in varying):
                varying.append(key)
        for r in runs:
            apart = ", ".join(f"{key}={r['settings'].get(key, '-')}" for key in varying)
            r["setting"] = f"{optimizer} ({apart})" if apart else optimizer


def on_lr_axis(r: dict[str, Any]) -> bool:
    """Whether run ``r`` has an lr a log lr axis can place (a job refused for ``lr=-1`` has none)."""
    return isinstance(r.get("lr"), (int, float)) and r["lr"] > 0


def has_test_acc(r: dict[str, Any]) -> bool:
    """Whether run ``r`` has a final test accuracy (a crashed, interrupted or unfinished run has none: not 0)."""
    return isinstance(r.get("final_test_acc"), (int, float)) and math.isfinite(r["final_test_acc"])


def tested_at_lr(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs an lr-accuracy figure can draw: an lr on the axis and a final test accuracy."""
    return [r for r in rows if on_lr_axis(r) and has_test_acc(r)]


def measured_at_start(r: dict[str, Any]) -> bool:
    """Whether the run's first sharpness measurement is at step 0 (``curvature.log_spaced_start``) and a
    number (not NaN: an unusable preconditioner), the sharpness at initialisation."""
    curvature = r.get("curvature") or {}
    value = curvature.get("initial_sharpness")
    return curvature.get("initial_step") == 0 and isinstance(value, (int, float)) and not math.isnan(value)


def width_key(widths: str) -> tuple:
    return tuple(int(w) for w in widths.split("x") if w.isdigit())


NUMBER = re.compile(r"((?<![\w.])-?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)")  # a sign only where no name goes on


def setting_key(setting: str) -> tuple:
    """Sort key of a setting's name, its numbers as numbers (``batch_size=32`` before ``batch_size=128``), then
    the name itself (``1e-05`` and ``0.00001`` are one number, two names: an order that does not vary)."""
    parts = NUMBER.split(setting)
    return tuple((1, float(part), "") if i % 2 else (0, 0.0, part) for i, part in enumerate(parts)), setting


def by_setting_and_width(item: tuple[tuple[str, str], Any]) -> tuple:
    """Sort key of ``((setting, widths), ...)`` items: by setting (:func:`setting_key`), then by width
    (numerically)."""
    (setting, widths), _ = item
    return setting_key(setting), width_key(widths)
