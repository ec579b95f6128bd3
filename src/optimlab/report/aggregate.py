"""The runs' rows aggregated: the regime map's cells (the label most seeds got), the stability table
(per optimizer and width, the largest stable lr the sharpness at the start predicts against the one
observed) and the seed table (mean and spread over seeds)."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from optimlab.regimes import LABELS
from optimlab.report.rows import (UNFINISHED, UNREADABLE, by_setting_and_width, has_test_acc, measured_at_start,
                                  on_lr_axis)


# What a figure colours a run by: its regime, or crashed (no diagnosis), interrupted (stopped before its end),
# unfinished (its record stops mid-run: still running, or killed) or unreadable (its summary); the last three
# drawn only where there is one.
PLOT_LABELS = (*LABELS, "crashed", "interrupted", UNFINISHED, UNREADABLE)
ONLY_WHERE_DRAWN = ("interrupted", UNFINISHED, UNREADABLE)


UNSTABLE = ("oscillating", "diverging")


def grid_position(lr: float, lrs: list[float]) -> float:
    """Where ``lr`` falls on the map's lr axis, in cells (log-linear between grid points)."""
    logs = [math.log(x) for x in lrs]
    x = math.log(lr)
    if x <= logs[0] or len(logs) == 1:
        return (x - logs[0]) / ((logs[1] - logs[0]) if len(logs) > 1 else 1.0)
    for i in range(1, len(logs)):
        if x <= logs[i]:
            return i - 1 + (x - logs[i - 1]) / (logs[i] - logs[i - 1])
    return len(logs) - 1 + (x - logs[-1]) / (logs[-1] - logs[-2])


@dataclass(frozen=True)
class MapCell:
    """The runs of one (setting, widths, lr) cell of a regime map (a setting: an optimizer and what else sets its
    runs apart, :func:`~optimlab.report.rows.name_settings`): the label most of them got
    (a tie goes to the label first in :data:`PLOT_LABELS`), whether all got it, and the mean final
    test accuracy of those that have one (None if none has)."""

    regime: str
    agreed: bool
    counts: dict[str, int]
    mean_test_acc: float | None


def plot_label(r: dict[str, Any]) -> str:
    """Run ``r``'s label among :data:`PLOT_LABELS` (one without a diagnosis counts as crashed)."""
    return r["regime"] if r["regime"] in PLOT_LABELS else "crashed"


def label_counts(runs: list[dict[str, Any]]) -> Counter[str]:
    """How many of ``runs`` got each of :data:`PLOT_LABELS` (:func:`plot_label`)."""
    return Counter(plot_label(r) for r in runs)


def majority(counts: Counter[str]) -> str:
    """The label most runs got (:func:`label_counts`); a tie goes to the label first in :data:`PLOT_LABELS`."""
    return max(PLOT_LABELS, key=lambda label: (counts[label], -PLOT_LABELS.index(label)))


def map_cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], MapCell]:
    """The regime map's cells, keyed ``(setting, widths, lr)`` (see
    :func:`~optimlab.report.rows.name_settings`), from the report's rows."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("setting") and r.get("widths") and on_lr_axis(r):
            groups[(r["setting"], r["widths"], r["lr"])].append(r)
    cells = {}
    for key, runs in groups.items():
        counts = label_counts(runs)
        regime = majority(counts)
        accs = [r["final_test_acc"] for r in runs if has_test_acc(r)]
        cells[key] = MapCell(regime, len(counts) == 1, dict(counts), statistics.fmean(accs) if accs else None)
    return cells


def stability_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (optimizer setting, widths) column of an lr sweep whose runs tracked their sharpness: ``sharpness0``
    (median over the column of each run's first measurement: step 0 with ``curvature.log_spaced_start``,
    for the adaptive optimizers preconditioned by :func:`~optimlab.curvature.initial_preconditioner`,
    the P their state settles to from the gradients at initialisation), the largest stable lr it predicts (the lr at
    which the threshold ``c/lr`` equals it: ``c / sharpness0``), the largest lr below the first at which at
    least half the runs (seeds) diverged (a median, as ``sharpness0`` is; a tie of two seeds counts, which the
    map, :func:`map_cells`, shows as the label first in its order, marked *), and whether the two lie within
    one grid cell of each other; and the same against the largest lr below the first at which at least half
    oscillated or diverged, together (a threshold crossed marks where instability starts; a run can oscillate
    and still not diverge). Where no lr of the column diverged, the observed value is its largest lr (a lower
    bound of the boundary). The observed lrs are those below the column's first diverging (unstable) cell, as
    its smallest lrs count up: a column whose cells are not monotone in lr gets no boundary from a stable cell
    above an unstable one. The cells are the column's own lrs (not the other columns'); a column whose
    boundary lies outside its grid (no lr diverged, or its smallest already did; the same for instability)
    has the verdict None, neither a hit nor a miss. Only runs measured at step 0 count: a first measurement
    after training started (``curvature.log_spaced_start=false``) is not the sharpness at initialisation."""
    columns: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if on_lr_axis(r) and measured_at_start(r):
            columns[(r["setting"], r["widths"])].append(r)
    table = []
    for (optimizer, widths), runs in sorted(columns.items(), key=by_setting_and_width):
        sharpness0 = statistics.median(r["curvature"]["initial_sharpness"] for r in runs)
        factor = statistics.median(r["curvature"]["initial_threshold"] * r["lr"] for r in runs)  # c in c/lr
        predicted = factor / sharpness0 if sharpness0 > 0 else math.inf
        regimes_at: dict[float, list[str]] = defaultdict(list)
        for r in runs:
            regimes_at[r["lr"]].append(r["regime"])
        column = sorted(regimes_at)

        def first_at_least_half(labels: tuple[str, ...]) -> float:
            return next((lr for lr in column if 2 * sum(regime in labels for regime in regimes_at[lr])
                         >= len(regimes_at[lr])), math.inf)

        first_diverging, first_unstable = first_at_least_half(("diverging",)), first_at_least_half(UNSTABLE)
        observed = max((lr for lr in column if lr < first_diverging), default=None)
        calm = max((lr for lr in column if lr < first_unstable), default=None)

        def near(lr: float | None, boundary: float) -> bool | None:
            """Within one of the column's cells; None where the boundary lies outside the grid."""
            if lr is None or not math.isfinite(boundary):
                return None
            return math.isfinite(predicted) and abs(grid_position(predicted, column) - column.index(lr)) <= 1

        table.append({"optimizer": optimizer, "width": widths, "sharpness0": sharpness0, "predicted_max_lr": predicted,
                      "observed_max_lr_without_divergence": observed,
                      "within_one_cell": near(observed, first_diverging),
                      "observed_max_lr_before_instability": calm,
                      "instability_within_one_cell": near(calm, first_unstable)})
    return table


def seed_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs whose whole config differs only in the seed (see :func:`~optimlab.report.rows.same_but_seed`),
    aggregated: mean and sample standard deviation (n - 1: a few seeds are a sample) of test accuracy over the
    seeds (``n``: how many; a seed is the pair of ``seed`` and ``data.seed``, so that a sweep of data seeds
    alone counts too; runs of one seed, a sweep that lists a value twice, are that seed's mean)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if has_test_acc(r):
            groups[r["same_but_seed"]].append(r)
    table = []
    for members in groups.values():
        per_seed: dict[Any, list[float]] = defaultdict(list)
        for m in members:
            per_seed[(m["seed"], m.get("data_seed"))].append(m["final_test_acc"])
        if len(per_seed) < 2:
            continue
        accs = [statistics.fmean(values) for values in per_seed.values()]
        first = members[0]
        table.append({**{k: first[k] for k in ("name", "model", "lr", "widths")}, "optimizer": first["setting"],
                      "n": len(accs), "mean": statistics.fmean(accs), "std": statistics.stdev(accs),
                      "regimes": ", ".join(f"{k} {v}" for k, v in Counter(m["regime"] for m in members).items())})
    return table
