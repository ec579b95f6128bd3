"""``optimlab-report <sweep dir>``: the runs' summary.json files -> tables and figures.

Writes next to the runs: ``report.md`` and ``report.csv`` (one row per run, crashed and
interrupted ones included), ``curves.png`` (per-run epoch curves titled with the diagnosed regime),
``lr_sensitivity.png`` (for lr sweeps), ``regime_map.png`` (for lr x width sweeps) and
``sharpness.png`` (for runs that tracked their sharpness, ``curvature.every_n_steps``). For a map
whose runs tracked their sharpness, ``stability.csv`` compares, per (optimizer, width) column (an
optimizer's *setting*, :func:`name_settings`, where the sweep varies more than lr, width and seed), the
largest stable lr the sharpness at the start predicts with the largest lr observed not to diverge;
the map draws the prediction.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimlab.curvature import SHARPNESS_TAG, THRESHOLD_TAG
from optimlab.regimes import LABELS, Thresholds, diagnose
from optimlab.summary import FINISHED, SUMMARY, config_key, data_passes, read_summary, validation_size

REGIME_COLORS = {"healthy": "#2ca02c", "slow": "#1f77b4", "oscillating": "#ff7f0e", "diverging": "#d62728",
                 "underfit": "#9467bd", "overfit": "#8c564b", "crashed": "#7f7f7f", "interrupted": "#bbbbbb",
                 "running": "#bbbbbb"}
PLOT_LABELS = (*LABELS, "crashed")  # what a figure colours a run by: its regime, or crashed (no diagnosis)
COLUMNS = ["run", "name", "model", "optimizer", "lr", "widths", "seed", "params", "final_train_acc",
           "best_train_acc", "final_val_acc", "best_val_acc", "final_test_acc", "best_test_acc", "epochs", "regime", "stopped_non_finite", "status",
           "wall_time_s", "steps_per_s", "sharpness_max", "sharpness_crossed_at_step", "setting", "error"]
ERROR_CHARS = 160  # of a crashed run's error (its first line) in the tables; the whole one is in its summary.json
MAX_CURVES = 48  # beyond this curves.png would be unreadable; the tables still list every run


def find_runs(sweep_dir: Path) -> list[Path]:
    """Every run directory under ``sweep_dir``: those with a summary.json, and Hydra job dirs
    (holding ``.hydra/``) whose job died before writing one."""
    dirs = {p.parent for p in sweep_dir.rglob(SUMMARY)} | {p.parent for p in sweep_dir.rglob(".hydra")}
    return sorted(dirs, key=lambda d: (_job_number(d.name), str(d)))


def _job_number(name: str) -> float:
    head = name.split("_", 1)[0]
    return int(head) if head.isdigit() else math.inf


def row_for(run_dir: Path, root: Path, rediagnose: bool = False) -> dict[str, Any]:
    """One report row. ``rediagnose``: label the run with the current rules (and the thresholds in
    its config) instead of the label its summary recorded."""
    s = read_summary(run_dir)
    rel = str(run_dir.relative_to(root)) if run_dir != root else "."
    if s is None:
        why = f"{SUMMARY} unreadable" if (run_dir / SUMMARY).exists() else f"no {SUMMARY} (the job ended before writing one)"
        return {"run": rel, "status": "crashed", "regime": "crashed", "epochs": 0, "history": [], "error": why}
    history, run = s.epochs, s.run

    def best(key: str) -> float | None:
        values = [r[key] for r in history if isinstance(r.get(key), (int, float))]
        return max(values) if values else None

    regime = s.regime
    if rediagnose:
        regime = diagnose(history, s.diverged, Thresholds.from_overrides(s.config.get("regimes")),
                          s.diverged_at_step, s.curvature, validation_size(s.config),
                          data_passes(s.config, len(history), s.train_size)).regime
    return {
        "run": rel, "name": run.name, "model": run.model, "optimizer": run.optimizer, "lr": run.lr,
        "widths": run.widths, "seed": run.seed, "params": s.params,
        "final_train_acc": history[-1].get("train_acc") if history else None, "best_train_acc": best("train_acc"),
        "final_val_acc": history[-1].get("val_acc") if history else None, "best_val_acc": best("val_acc"),
        "final_test_acc": s.test_acc, "best_test_acc": best("test_acc"), "epochs": len(history),
        "regime": regime if s.status in FINISHED else s.status,
        "stopped_non_finite": s.diverged, "status": s.status, "wall_time_s": s.wall_time_s,
        "steps_per_s": s.steps_per_s, "history": history, "same_but_seed": same_but_seed(s.config),
        "settings": flat_settings(s.config),
        "curvature": s.curvature, "diverged_at_step": s.diverged_at_step,
        "sharpness_max": (s.curvature or {}).get("sharpness_max"),
        "sharpness_crossed_at_step": (s.curvature or {}).get("first_crossing_step"),
        "error": s.error.strip().splitlines()[0][:ERROR_CHARS] if s.error and s.error.strip() else None,
    }


# Keys that may differ between runs that are otherwise the same experiment: the seed (and the data
# module's copy of it) and where and how a run was launched (the population launcher's plan included).
NOT_THE_EXPERIMENT = ("seed", "data.seed", "resume", "data.root", "trainer.progress_bar", "trainer.num_threads",
                      "population")


def same_but_seed(config: dict[str, Any]) -> str:
    """The run's whole config except :data:`NOT_THE_EXPERIMENT`, as a key: runs with equal keys
    differ only in their seed."""
    return config_key(config, NOT_THE_EXPERIMENT)


# What a map's axes vary: the learning rate and the widths (the optimizer class is its panels); and the
# run's name, a label (experiments differing in lr alone are one setting).
MAP_AXES = ("name", "lr", "optimizer.lr", "optimizer._target_", "optimizer.impl", "model.hidden", "model.channels")


def flat_settings(config: dict[str, Any]) -> dict[str, str]:
    """The run's config as dotted keys and their values (as text), without :data:`NOT_THE_EXPERIMENT`
    and :data:`MAP_AXES`."""
    skipped = (*NOT_THE_EXPERIMENT, *MAP_AXES)
    flat: dict[str, str] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            dotted = prefix + str(key)
            if dotted in skipped:
                continue
            if isinstance(value, dict):
                walk(value, dotted + ".")
            else:
                flat[dotted] = value if isinstance(value, str) else json.dumps(value)

    walk(config, "")
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
        keys = sorted({key for r in runs for key in r["settings"]})
        varying = [key for key in keys if len({r["settings"][key] for r in runs if key in r["settings"]}) > 1]
        for r in runs:
            apart = ", ".join(f"{key}={r['settings'].get(key, '-')}" for key in varying)
            r["setting"] = f"{optimizer} ({apart})" if apart else optimizer


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV file of ``columns`` (other keys left out)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(columns: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """The lines of a markdown table: ``columns``, then each row's cells (:func:`_fmt`, ``|`` escaped)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(_fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows)]


def by_setting_and_width(item: tuple[tuple[str, str], Any]) -> tuple:
    """Sort key of ``((setting, widths), ...)`` items: by setting, then by width (numerically)."""
    (setting, widths), _ = item
    return setting, _width_key(widths)


def table_lines(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """report.md's head: counts, the command, the findings, the runs and the seed table."""
    lines = ["# Sweep report", "", f"{len(rows)} runs. Regimes: " + ", ".join(
        f"{label} {n}" for label, n in Counter(r["regime"] for r in rows).items()), ""]
    command = sweep_command(out)
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["What this sweep shows: " + findings(rows), ""]
    lines += markdown_table(COLUMNS, ([r.get(c) for c in COLUMNS] for r in rows))
    seeds = seed_table(rows)
    if seeds:
        lines += ["", "## Over seeds (mean +/- std)", ""]
        lines += markdown_table(["name", "model", "optimizer", "lr", "widths", "seeds", "final test acc", "regimes"],
                                ([g["name"], g["model"], g["optimizer"], g["lr"], g["widths"], g["n"],
                                  f"{g['mean']:.4f} +/- {g['std']:.4f}", g["regimes"]] for g in seeds))
    return lines


OUTPUTS = ("report.md", "report.csv", "curves.png", "lr_sensitivity.png", "sharpness.png", "stability.csv",
           "regime_map.png")  # everything report() may write
STABILITY_COLUMNS = ["optimizer", "widths", "sharpness0", "predicted_max_lr", "observed_max_lr_without_divergence",
                     "within_one_cell", "observed_max_lr_before_instability", "instability_within_one_cell"]
UNSTABLE = ("oscillating", "diverging")


def on_lr_axis(r: dict[str, Any]) -> bool:
    """Whether run ``r`` has an lr a log lr axis can place (a job refused for ``lr=-1`` has none)."""
    return isinstance(r.get("lr"), (int, float)) and r["lr"] > 0


def _grid_position(lr: float, lrs: list[float]) -> float:
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
    """The runs of one (optimizer, widths, lr) cell of a regime map: the label most of them got
    (a tie goes to the label first in :data:`PLOT_LABELS`), whether all got it, and the mean final
    test accuracy of those that have one (None if none has)."""

    regime: str
    agreed: bool
    counts: dict[str, int]
    mean_test_acc: float | None


def map_cells(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], MapCell]:
    """The regime map's cells, keyed ``(setting, widths, lr)`` (see :func:`name_settings`), from the
    report's rows."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("setting") and r.get("widths") and on_lr_axis(r):
            groups[(r["setting"], r["widths"], r["lr"])].append(r)
    cells = {}
    for key, runs in groups.items():
        counts = Counter(r["regime"] if r["regime"] in PLOT_LABELS else "crashed" for r in runs)
        regime = max(PLOT_LABELS, key=lambda label: (counts[label], -PLOT_LABELS.index(label)))
        accs = [r["final_test_acc"] for r in runs if r.get("final_test_acc") is not None]
        cells[key] = MapCell(regime, len(counts) == 1, dict(counts), statistics.fmean(accs) if accs else None)
    return cells


def stability_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (optimizer setting, widths) column of an lr sweep whose runs tracked their sharpness: ``sharpness0``
    (median over the column of each run's first measurement: step 0 with ``curvature.log_spaced_start``,
    for the adaptive optimizers preconditioned by :func:`~optimlab.curvature.initial_preconditioner`,
    the P their state settles to from the gradients at initialisation), the largest stable lr it predicts (the lr at
    which the threshold ``c/lr`` equals it: ``c / sharpness0``), the largest lr whose runs (the label
    most got, as on the map: :func:`map_cells`) did not diverge, and whether the two lie within one
    grid cell of each other; and the same against the largest lr below the first oscillating or
    diverging cell (a threshold crossed marks where instability starts; a run can oscillate and
    still not diverge). The cells are the column's own lrs (not the other columns'); a column in which
    no lr diverged (or none was unstable) has its boundary above its grid: its verdict is None, not a hit."""
    columns: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if on_lr_axis(r) and (r.get("curvature") or {}).get("initial_sharpness"):
            columns[(r["setting"], r["widths"])].append(r)
    table = []
    for (optimizer, widths), runs in sorted(columns.items(), key=by_setting_and_width):
        sharpness0 = statistics.median(r["curvature"]["initial_sharpness"] for r in runs)
        factor = statistics.median(r["curvature"]["initial_threshold"] * r["lr"] for r in runs)  # c in c/lr
        predicted = factor / sharpness0 if sharpness0 > 0 else math.inf
        cells = map_cells(runs)
        column = sorted(lr for (_, _, lr) in cells)
        regimes = [cells[(optimizer, widths, lr)].regime for lr in column]
        stable = [lr for lr, regime in zip(column, regimes) if regime != "diverging"]
        observed = max(stable) if stable else None
        first_unstable = next((lr for lr, regime in zip(column, regimes) if regime in UNSTABLE), math.inf)
        calm = max((lr for lr in column if lr < first_unstable), default=None)

        def near(lr: float | None, bounded: bool) -> bool | None:
            """Within one of the column's cells; None where the boundary lies above the grid."""
            if not bounded:
                return None
            return lr is not None and math.isfinite(predicted) and abs(_grid_position(predicted, column) - column.index(lr)) <= 1

        table.append({"optimizer": optimizer, "widths": widths, "sharpness0": sharpness0, "predicted_max_lr": predicted,
                      "observed_max_lr_without_divergence": observed,
                      "within_one_cell": near(observed, "diverging" in regimes),
                      "observed_max_lr_before_instability": calm,
                      "instability_within_one_cell": near(calm, math.isfinite(first_unstable))})
    return table


def write_stability(table: list[dict[str, Any]], out: Path) -> list[str]:
    """``stability.csv``; the lines report.md gets."""
    write_csv(out / "stability.csv", STABILITY_COLUMNS, table)

    def count(key: str) -> str:
        judged = [t[key] for t in table if t[key] is not None]
        open_ended = len(table) - len(judged)
        return f"{sum(judged)} of {len(judged)} columns" + (
            f" (and {open_ended} with no such lr in its grid, the boundary above it)" if open_ended else "")

    lines = ["", "## Stability: predicted vs observed largest lr", "",
             f"The sharpness at the start predicts the largest stable lr within one grid cell of the largest lr "
             f"observed not to diverge in {count('within_one_cell')}, and of the largest lr below the first "
             f"oscillating or diverging one in {count('instability_within_one_cell')}.", ""]
    return lines + markdown_table(STABILITY_COLUMNS, ([t[c] for c in STABILITY_COLUMNS] for t in table))


CROSSING_COLUMNS = ["optimizer", "tracked", "crossed", "then diverging", "then oscillating", "false alarms",
                    "misses", "started above", "started above: diverging", "started below: diverging"]


def _crossing_counts(runs: list[dict[str, Any]]) -> dict[str, int]:
    """The counts of :data:`CROSSING_COLUMNS` (but the optimizer) over ``runs``. A run "started above"
    when its first measurement, at step 0 (``curvature.log_spaced_start``), is above the threshold."""
    crossed = [r for r in runs if r["curvature"].get("first_crossing_step") is not None]
    outcome = Counter(r["regime"] for r in crossed)
    # A step-0 value that is missing or NaN (an unusable preconditioner) counts on neither side.
    at_start = [r for r in runs if r["curvature"].get("initial_step") == 0
                and isinstance(r["curvature"].get("initial_sharpness"), (int, float))
                and not math.isnan(r["curvature"]["initial_sharpness"])]
    above = [r for r in at_start if r["curvature"]["initial_sharpness"] > r["curvature"]["initial_threshold"]]
    below = [r for r in at_start if r["curvature"]["initial_sharpness"] <= r["curvature"]["initial_threshold"]]
    return {"tracked": len(runs), "crossed": len(crossed), "then diverging": outcome["diverging"],
            "then oscillating": outcome["oscillating"],
            "false alarms": len(crossed) - outcome["diverging"] - outcome["oscillating"],
            "misses": sum(r["regime"] == "diverging" and r["curvature"].get("first_crossing_step") is None for r in runs),
            "started above": len(above), "started above: diverging": sum(r["regime"] == "diverging" for r in above),
            "started below: diverging": sum(r["regime"] == "diverging" for r in below)}


def crossing_lines(rows: list[dict[str, Any]]) -> list[str]:
    """report.md's account of a tracked sweep: how many runs crossed the stability threshold, what
    became of them (a crossing not followed by a ``diverging`` label is a false alarm; one followed
    by ``oscillating`` is counted apart), how many diverging runs never crossed it (misses), for
    runs stopped on a non-finite value after a crossing how many steps the crossing came first, and
    per optimizer the same counts beside those of the runs that started above the threshold."""
    tracked = [r for r in rows if (r.get("curvature") or {}).get("measurements")]
    total = _crossing_counts(tracked)
    crossed = [r for r in tracked if r["curvature"].get("first_crossing_step") is not None]
    leads = sorted(r["diverged_at_step"] - r["curvature"]["first_crossing_step"] for r in crossed
                   if r.get("diverged_at_step") is not None)
    lines = ["", "## Crossings of the stability threshold", "",
             f"{total['crossed']} of {total['tracked']} tracked runs crossed it: {total['then diverging']} were then "
             f"labelled diverging, {total['then oscillating']} oscillating and {total['false alarms']} something else "
             f"(false alarms, counting oscillating as none: {total['crossed'] - total['then diverging']}). "
             f"{total['misses']} diverging run(s) never crossed it."]
    if leads:
        lines.append(f"{len(leads)} crossing run(s) stopped on a non-finite value, the crossing "
                     f"{statistics.median(leads):g} steps before it (median; {leads[0]} to {leads[-1]}).")
    else:
        lines.append("No crossing run stopped on a non-finite value: no lead to measure.")
    by_setting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in tracked:
        by_setting[r["setting"]].append(r)  # as the map's panels
    lines += ["", "Per optimizer setting (started above / below: the first measurement, at step 0, above or below the "
              "threshold):", ""]
    table = []
    for setting, runs in sorted(by_setting.items()):
        counts = _crossing_counts(runs)
        table.append([setting, *(counts[c] for c in CROSSING_COLUMNS[1:])])
    return lines + markdown_table(CROSSING_COLUMNS, table)


def findings(rows: list[dict[str, Any]]) -> str:
    """Where each regime appeared, in words: per label, per optimizer and width, its lr range."""
    parts = []
    for label in [*LABELS, "crashed", "interrupted", "running"]:
        where: dict[tuple[str, str], list[float]] = defaultdict(list)
        for r in rows:
            if r["regime"] == label and r.get("lr"):
                where[(r["setting"], r["widths"])].append(r["lr"])
        if where:
            cells = [f"{o} {w or '-'} at lr {_fmt(min(lrs))}" + (f" to {_fmt(max(lrs))}" if max(lrs) > min(lrs) else "")
                     for (o, w), lrs in sorted(where.items(), key=by_setting_and_width)]
            parts.append(f"**{label}** in {'; '.join(cells)}")
    return ". ".join(parts) + "." if parts else "no finished runs."


def sweep_command(sweep_dir: Path) -> str | None:
    """The command that ran the sweep, from Hydra's ``multirun.yaml`` (None when there is none)."""
    from omegaconf import OmegaConf

    try:
        overrides = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides
    except Exception:  # missing or not Hydra's file: the report goes on without the command
        return None
    hydra = [o for o in overrides.get("hydra", []) if not o.startswith("hydra.mode=")]
    return " ".join(["python train.py -m", *hydra, *overrides.get("task", [])])


def seed_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs whose whole config differs only in the seed (see :func:`same_but_seed`), aggregated: mean and (population) std of test accuracy."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("final_test_acc") is not None:
            groups[r["same_but_seed"]].append(r)
    table = []
    for members in groups.values():
        if len({m["seed"] for m in members}) < 2:
            continue
        accs = [m["final_test_acc"] for m in members]
        first = members[0]
        table.append({**{k: first[k] for k in ("name", "model", "lr", "widths")}, "optimizer": first["setting"],
                      "n": len(accs), "mean": statistics.fmean(accs), "std": statistics.pstdev(accs),
                      "regimes": ", ".join(f"{k} {v}" for k, v in Counter(m["regime"] for m in members).items())})
    return table


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_grid(plt: Any, n: int, cols: int) -> tuple[Any, Any]:
    """A figure of ``n`` run panels, ``cols`` a row; the unused cells of the last row hidden."""
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


def _run_titles(runs: list[dict[str, Any]]) -> list[str]:
    """Each panel's title: name, optimizer and lr, and below it the label; where two runs would share
    a title, also their setting, widths and seed (a sweep over seeds or widths drew identical ones)."""
    heads = [f"{r.get('name') or r['run']}: {r.get('optimizer')} lr {_fmt(r.get('lr'))}" for r in runs]
    shared = {head for head, n in Counter(heads).items() if n > 1}
    return [(f"{r.get('name') or r['run']}: {r.get('setting') or r.get('optimizer')} lr {_fmt(r.get('lr'))}\n"
             f"{r.get('widths') or '-'}, seed {_fmt(r.get('seed'))}: {r['regime']}") if head in shared
            else f"{head}\n{r['regime']}" for head, r in zip(heads, runs)]


def plot_curves(rows: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    runs = [r for r in rows if r["history"]][:MAX_CURVES]
    fig, axes = _panel_grid(plt, len(runs), min(4, len(runs)))
    for ax, r, title in zip(axes.flat, runs, _run_titles(runs)):
        epochs = [h["epoch"] for h in r["history"]]
        for key, style in (("train_acc", "-"), ("val_acc", ":"), ("test_acc", "--")):
            ax.plot(epochs, [h.get(key) for h in r["history"]], style, color="black", label=key.replace("_", " "))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel("accuracy")
        loss_ax = ax.twinx()
        for key, style in (("train_loss", "-"), ("test_loss", "--"), ("train_loss_max", ":")):
            loss_ax.plot(epochs, [h.get(key) for h in r["history"]], style, color="tab:red", alpha=0.7,
                         label="largest step loss" if key == "train_loss_max" else key.replace("_", " "))
        loss_ax.set_ylabel("loss", color="tab:red")
        loss_ax.set_yscale("log")
        color = REGIME_COLORS.get(r["regime"], "black")
        ax.set_title(title, color=color, fontsize=10, fontweight="bold")
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2)
    acc_handles, acc_labels = axes.flat[0].get_legend_handles_labels()
    loss_handles, loss_labels = fig.axes[-1].get_legend_handles_labels() if runs else ([], [])
    fig.legend(acc_handles + loss_handles, acc_labels + loss_labels, loc="lower center", ncol=6, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lr_sensitivity(rows: list[dict[str, Any]], path: Path) -> None:
    """Final test accuracy against lr, one line per optimizer, points coloured by regime (majority
    over seeds); one panel per model width when the sweep varies it."""
    plt = _plt()
    widths = sorted({r["widths"] for r in rows if on_lr_axis(r)}, key=_width_key)
    optimizers = sorted({r["setting"] for r in rows if on_lr_axis(r)})
    # optimizers by line style and marker, never by colour: colour means the regime
    styles = {o: (["-", "--", ":", "-."][i % 4], "osD^v<>"[i % 7]) for i, o in enumerate(optimizers)}
    cols = min(3, len(widths))  # rows of three: readable at README width
    fig, axes = _panel_grid(plt, len(widths), cols)
    for ax, width in zip(axes.flat, widths):
        by_opt: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if on_lr_axis(r) and r["widths"] == width:
                by_opt[r["setting"]][r["lr"]].append(r)
        for optimizer, points in sorted(by_opt.items()):
            lrs = sorted(points)
            means = [statistics.fmean([m["final_test_acc"] or 0.0 for m in points[lr]]) for lr in lrs]
            line, marker = styles[optimizer]
            ax.plot(lrs, means, line, color="0.35", zorder=2)
            for lr, mean in zip(lrs, means):
                regimes = Counter(m["regime"] for m in points[lr])
                ax.scatter([lr], [mean], color=REGIME_COLORS.get(max(regimes, key=regimes.get), "black"),
                           marker=marker, zorder=3, s=40, edgecolor="black", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylim(0, 1)
        ax.set_title(f"widths {width}" if len(widths) > 1 else "")
        ax.set_ylabel("final test accuracy")
    handles = [plt.Line2D([], [], color="0.35", ls=line, marker=marker, mfc="white", mec="black")
               for line, marker in styles.values()]
    handles += [plt.Line2D([], [], ls="", marker="o", color=REGIME_COLORS[label], mec="black") for label in PLOT_LABELS]
    # below the panels (a legend inside would hide points), two entries per panel's width in a row, on
    # height added for it
    ncol = 2 * cols
    legend_height = 0.25 * math.ceil(len(handles) / ncol) + 0.1
    fig.set_figheight(fig.get_figheight() + legend_height)
    fig.legend(handles, [*styles, *PLOT_LABELS], fontsize=9, loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def disagreement_lines(cells: dict[tuple[str, str, float], MapCell]) -> list[str]:
    """report.md's section on the map cells whose runs (seeds) got different labels."""
    several = {key: c for key, c in cells.items() if sum(c.counts.values()) > 1}
    if not several:
        return []
    split = sorted((key, c) for key, c in several.items() if not c.agreed)
    lines = ["", "## Regime map", "", f"{len(several)} cells of several runs; in {len(split)} of them the runs "
             "(seeds) disagree, marked * on the map, which shows the label most of them got:"]
    if split:
        lines += ["", "| optimizer | widths | lr | shown | regimes |", "|---|---|---|---|---|"]
        lines += [f"| {opt} | {widths} | {_fmt(lr)} | {c.regime} | "
                  + ", ".join(f"{label} {n}" for label, n in sorted(c.counts.items())) + " |"
                  for (opt, widths, lr), c in split]
    return lines


def plot_regime_map(cells: dict[tuple[str, str, float], MapCell], path: Path,
                    stability: list[dict[str, Any]] | None = None) -> None:
    """One panel per optimizer (setting, :func:`name_settings`): lr (x) by width (y), each cell (:func:`map_cells`) coloured by the
    regime most of its runs got, marked * where they disagree, and annotated with their mean final
    test accuracy; with ``stability`` (:func:`stability_table`), a black bar at each width's
    predicted largest stable lr."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    labels = list(PLOT_LABELS)
    optimizers = sorted({key[0] for key in cells})
    lrs = sorted({key[2] for key in cells})
    widths = sorted({key[1] for key in cells}, key=_width_key)
    fig, axes = plt.subplots(1, len(optimizers), figsize=(3.2 + 0.45 * len(lrs) * len(optimizers), 0.5 * len(widths) + 2),
                             squeeze=False)
    cmap = ListedColormap([REGIME_COLORS[label] for label in labels])
    for ax, optimizer in zip(axes.flat, optimizers):
        grid = [[math.nan] * len(lrs) for _ in widths]
        for i, w in enumerate(widths):
            for j, lr in enumerate(lrs):
                cell = cells.get((optimizer, w, lr))
                if cell is None:
                    continue
                grid[i][j] = labels.index(cell.regime)
                text = "" if cell.mean_test_acc is None else f"{100 * cell.mean_test_acc:.0f}"
                if not cell.agreed:
                    text += "*"
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white")
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(labels) - 0.5, aspect="auto", origin="lower")
        for t in stability or []:
            if t["optimizer"] == optimizer and t["widths"] in widths and math.isfinite(t["predicted_max_lr"]):
                x, i = _grid_position(t["predicted_max_lr"], lrs), widths.index(t["widths"])
                if -0.5 <= x <= len(lrs) - 0.5:
                    ax.plot([x, x], [i - 0.45, i + 0.45], color="black", lw=2.5)
        ax.set_xticks(range(len(lrs)), [_fmt(lr) for lr in lrs], rotation=60, fontsize=7)
        ax.set_yticks(range(len(widths)), widths, fontsize=7)
        ax.set_xlabel("learning rate")
        ax.set_title(optimizer.replace(" (", "\n(", 1), fontsize=10)
    axes.flat[0].set_ylabel("hidden width")
    handles = [plt.Rectangle((0, 0), 1, 1, color=REGIME_COLORS[label]) for label in labels]
    if stability:
        handles.append(plt.Line2D([], [], color="black", lw=2.5))
        labels = [*labels, "predicted largest stable lr"]
    # three entries a row: a row of eight is wider than a narrow map and would be cut at both edges
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), frameon=False, fontsize=8)
    fig.suptitle("Diagnosed regime: the label most runs got\n(cell text: mean final test accuracy, %; *: runs disagree)",
                 fontsize=10)
    legend_inches = 0.15 + 0.17 * math.ceil(len(labels) / 3)  # the legend's rows of 8-point text
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sharpness_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The run's logged ``curvature/sharpness`` and ``curvature/threshold`` as (steps, values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run_dir / "tensorboard").is_dir():
        return {}
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in (SHARPNESS_TAG, THRESHOLD_TAG) if tag in tags}


def plot_sharpness(rows: list[dict[str, Any]], root: Path, path: Path) -> None:
    """Per tracked run: the (preconditioned) sharpness against the optimizer's stability threshold,
    step by step (log scale), the first crossing and the first non-finite value marked."""
    plt = _plt()
    tracked = [(r, series) for r in rows if r.get("curvature") and (series := sharpness_series(root / r["run"]))]
    runs = tracked[:MAX_CURVES]
    if not runs:
        return
    fig, axes = _panel_grid(plt, len(runs), 2 if len(runs) <= 4 else 4)  # two a row for a few: README width
    for ax, (r, series), title in zip(axes.flat, runs, _run_titles([r for r, _ in runs])):
        curvature = r["curvature"]
        color = REGIME_COLORS.get(r["regime"], "black")
        what = "preconditioned sharpness" if curvature.get("preconditioned") else "sharpness"
        if SHARPNESS_TAG in series:
            ax.plot(*series[SHARPNESS_TAG], "-", color=color, label=what)
        if THRESHOLD_TAG in series:
            ax.plot(*series[THRESHOLD_TAG], "--", color="black", label=curvature.get("threshold_formula") or "threshold")
        if curvature.get("first_crossing_step") is not None:
            ax.axvline(curvature["first_crossing_step"], color=color, alpha=0.4, lw=1)
        if r.get("diverged_at_step") is not None:
            ax.axvline(r["diverged_at_step"], color="black", ls=":", lw=1, label="first non-finite value")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="best")
        ax.set_title(title, color=color, fontsize=10, fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _width_key(widths: str) -> tuple:
    return tuple(int(w) for w in widths.split("x") if w.isdigit())


def report(sweep_dir: Path, rediagnose: bool = False) -> list[Path]:
    """Write the tables and the figures that fit this sweep; return the files written."""
    rows = [row_for(d, sweep_dir, rediagnose) for d in find_runs(sweep_dir)]
    if not rows:
        raise FileNotFoundError(f"no runs (no {SUMMARY} or .hydra/ folders) under {sweep_dir}")
    name_settings(rows)
    for name in OUTPUTS:  # what an earlier report wrote and this one does not would pass for this one's
        (sweep_dir / name).unlink(missing_ok=True)
    write_csv(sweep_dir / "report.csv", COLUMNS, rows)
    lines = table_lines(rows, sweep_dir)
    written = [sweep_dir / "report.md", sweep_dir / "report.csv"]
    several_lrs = len({r["lr"] for r in rows if on_lr_axis(r)}) > 1
    if any(r["history"] for r in rows):
        plot_curves(rows, sweep_dir / "curves.png")
        written.append(sweep_dir / "curves.png")
    if several_lrs:
        plot_lr_sensitivity(rows, sweep_dir / "lr_sensitivity.png")
        written.append(sweep_dir / "lr_sensitivity.png")
    if any(r.get("curvature") for r in rows):
        plot_sharpness(rows, sweep_dir, sweep_dir / "sharpness.png")
        if (sweep_dir / "sharpness.png").exists():
            written.append(sweep_dir / "sharpness.png")
    if any((r.get("curvature") or {}).get("measurements") for r in rows):
        lines += crossing_lines(rows)
    stability = stability_table(rows) if several_lrs else []
    if stability:
        lines += write_stability(stability, sweep_dir)
        written.append(sweep_dir / "stability.csv")
    # an lr x width map: widths of one model kind (a CNN's channels are not an MLP's widths)
    regime_map = several_lrs and len({r["widths"] for r in rows if r.get("widths")}) > 1 \
        and len({r["model"] for r in rows if r.get("model")}) == 1
    cells = map_cells(rows) if regime_map else {}
    lines += disagreement_lines(cells)
    (sweep_dir / "report.md").write_text("\n".join(lines) + "\n")
    if regime_map:
        plot_regime_map(cells, sweep_dir / "regime_map.png", stability)
        written.append(sweep_dir / "regime_map.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimlab-report", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (or any folder of runs)")
    parser.add_argument("--rediagnose", action="store_true",
                        help="label every run with the current diagnosis rules instead of its recorded regime")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        what = "is not a directory" if args.sweep_dir.exists() else "does not exist"
        print(f"error: {args.sweep_dir} {what}", file=sys.stderr)
        return 2
    try:
        written = report(args.sweep_dir, args.rediagnose)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = list(csv.DictReader((args.sweep_dir / "report.csv").open()))
    print(f"{len(rows)} runs: " + ", ".join(f"{k} {v}" for k, v in Counter(r["regime"] for r in rows).items()))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
