"""The report's tables: ``report.csv``, ``stability.csv`` and the markdown of ``report.md`` (the runs,
what the sweep shows, the seeds, the stability and the sharpness crossings)."""

from __future__ import annotations

import csv
import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optimlab.report.aggregate import PLOT_LABELS, MapCell, seed_table
from optimlab.report.rows import by_setting_and_width, measured_at_start, setting_key, width_key


COLUMNS = ["run", "name", "model", "optimizer", "lr", "widths", "seed", "params", "final_train_acc",
           "best_train_acc", "final_val_acc", "best_val_acc", "final_test_acc", "best_test_acc", "epochs", "regime",
           "stopped_non_finite", "status",
           "wall_time_s", "steps_per_s", "sharpness_max", "sharpness_crossed_at_step", "setting", "error"]


def fmt(value: Any) -> str:
    """A table cell: empty for None; a float below 0.1 or from 1e4 up to four significant digits (lr 0.00316 and
    0.0032 apart), else to four decimals (trailing zeros dropped); anything else as text."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 0.1 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """``rows`` as a CSV file of ``columns`` (other keys left out)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(columns: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    """The lines of a markdown table: ``columns``, then each row's cells (:func:`fmt`, ``|`` escaped)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(fmt(cell).replace("|", "\\|") for cell in row) + " |" for row in rows)]


def multirun_record(sweep_dir: Path) -> Any:
    """The ``hydra`` node of the sweep's ``multirun.yaml``, Hydra's record of the command (None where there is
    none), unresolved: an override is text, and one like seed=${hydra:job.num} resolves only inside Hydra."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml").hydra, resolve=False)
    except Exception:  # missing or not Hydra's file: the report goes on without it
        return None


def sweep_command(hydra: Any) -> str | None:
    """The command that ran the sweep, from its :func:`multirun_record` (None when there is none)."""
    overrides = (hydra or {}).get("overrides") or {}
    if not overrides:
        return None
    given = [o for o in overrides.get("hydra") or [] if not o.startswith("hydra.mode=")]
    return " ".join(["python train.py -m", *given, *(overrides.get("task") or [])])


def command_jobs(hydra: Any) -> list[list[str]] | None:
    """The overrides of each job the command makes, from its :func:`multirun_record`, for Hydra's basic
    sweeper: every combination of each swept key's values (the sweep config's ``params``, then the command's
    overrides, which replace them; a value given twice is two jobs), as that sweeper writes them. None for
    another sweeper or a sweep it cannot expand (``glob``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        if not str(hydra["sweeper"]["_target_"]).endswith(".BasicSweeper"):
            return None
        lines = [f"{key}={value}" for key, value in (hydra["sweeper"].get("params") or {}).items()]
        axes = {}
        for o in OverridesParser.create().parse_overrides([*lines, *hydra["overrides"]["task"]]):
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            axes[o.key_or_group] = [f"{o.get_key_element()}={value}" for value in values]
        return [list(job) for job in itertools.product(*axes.values())]
    except Exception:  # no record, another layout, a sweep only Hydra's config loader expands
        return None


def job_key(overrides: Iterable[str], ignored: Iterable[str]) -> frozenset[tuple[str, str]]:
    """A job's overrides as Hydra parses them (``false`` and ``False`` alike), without the ``ignored`` keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    ignored = set(ignored)
    return frozenset((o.get_key_element(), o.get_value_element_as_str())
                     for o in OverridesParser.create().parse_overrides(list(overrides))
                     if o.key_or_group not in ignored)


def jobs_line(rows: list[dict[str, Any]], sweep_dir: Path, hydra: Any) -> str:
    """What follows the run count under report.md's title: how many of the command's jobs have no record,
    and how many runs of the folder are of other commands (a run is its command's when Hydra's record of
    its job holds one of the command's jobs; where a run has no such record, counted from the numbers)."""
    from optimlab.hydra_job import recorded_overrides  # (Hydra imported only where a report reads its records)
    from optimlab.command_line import RESUME_OVERRIDES, override_keys

    jobs = command_jobs(hydra)
    if not jobs:
        return ""
    # A resumed sweep's command names resume, and may change what a resume may (epochs=8), which the record
    # of each job it continued does not hold.
    resumed = any(key == "resume" and o.partition("=")[2] not in ("null", "")
                  for o, key in zip(jobs[0], override_keys(jobs[0])))
    ignored = RESUME_OVERRIDES if resumed else ("resume",)
    recorded = [recorded_overrides(sweep_dir / row["run"]) for row in rows]
    if None in recorded:
        ours = min(len(rows), len(jobs))
    else:
        made = Counter(job_key(job, ignored) for job in jobs)
        ours = sum((made & Counter(job_key(overrides, ignored) for overrides in recorded)).values())
    missing, others = len(jobs) - ours, len(rows) - ours
    never = f"{missing} never started: no record" if missing else ""
    if not others:
        return f" of its command's {len(jobs)} jobs ({never})" if missing else ""
    return (f" (its command, below, makes {len(jobs)}{', ' + never if missing else ''}; {others} of the folder's "
            "runs are of other commands)")


def is_number(value: Any) -> bool:
    """Whether a value is a number (a bool is none)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def lr_range(lrs: list[Any], grid: list[float]) -> str:
    """The numbers as spans of neighbours on ``grid`` (the sorted lrs of their column), ``lo to hi`` each
    (``0.3, 3`` where 1 between them got another label), then any other values as given (a refused job's
    ``lr=abc``)."""
    numbers = sorted({v for v in lrs if is_number(v)})
    place = {lr: i for i, lr in enumerate(grid)}
    spans: list[list[float]] = []
    for lr in numbers:
        if spans and place[lr] == place[spans[-1][-1]] + 1:
            spans[-1].append(lr)
        else:
            spans.append([lr])
    words = [fmt(span[0]) + (f" to {fmt(span[-1])}" if len(span) > 1 else "") for span in spans]
    return ", ".join(words + sorted({str(v) for v in lrs if not is_number(v)}))


def findings(rows: list[dict[str, Any]]) -> str:
    """Where each regime appeared, in words: per label, per optimizer and width, its lrs (spans of neighbouring
    lrs of that column)."""
    def column(r: dict[str, Any]) -> tuple[str, str]:
        return r["setting"], r["widths"]

    grids: dict[tuple[str, str], set[float]] = defaultdict(set)
    for r in rows:
        if is_number(r.get("lr")):
            grids[column(r)].add(r["lr"])
    parts = []
    for label in PLOT_LABELS:
        where: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for r in rows:
            if r["regime"] == label and r.get("lr") not in (None, ""):  # lr 0 too (a refused job's)
                where[column(r)].append(r["lr"])
        if where:
            cells = [f"{o} {w or '-'} at lr {lr_range(lrs, sorted(grids[(o, w)]))}"
                     for (o, w), lrs in sorted(where.items(), key=by_setting_and_width)]
            parts.append(f"**{label}** in {'; '.join(cells)}")
    return ". ".join(parts) + "." if parts else "no finished runs."


def table_lines(rows: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """report.md's head: counts, the command, the findings, the runs and the seed table."""
    hydra = multirun_record(sweep_dir)
    jobs = jobs_line(rows, sweep_dir, hydra)
    lines = ["# Sweep report", "", f"{len(rows)} run{'s' * (len(rows) != 1)}{jobs}. Regimes: " + ", ".join(
        f"{label} {n}" for label, n in Counter(r["regime"] for r in rows).items()), ""]
    command = sweep_command(hydra)
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["What this sweep shows: " + findings(rows), ""]
    lines += markdown_table(COLUMNS, ([r.get(c) for c in COLUMNS] for r in rows))
    seeds = seed_table(rows)
    if seeds:
        lines += ["", "## Over seeds (mean +/- sample std)", ""]
        lines += markdown_table(["name", "model", "optimizer", "lr", "widths", "seeds", "final test acc", "regimes"],
                                ([g["name"], g["model"], g["optimizer"], g["lr"], g["widths"], g["n"],
                                  f"{g['mean']:.4f} +/- {g['std']:.4f}", g["regimes"]] for g in seeds))
    return lines


STABILITY_COLUMNS = ["optimizer", "width", "sharpness0", "predicted_max_lr", "observed_max_lr_without_divergence",
                     "within_one_cell", "observed_max_lr_before_instability", "instability_within_one_cell"]


def write_stability(table: list[dict[str, Any]], out: Path) -> list[str]:
    """``stability.csv``; the lines report.md gets."""
    write_csv(out / "stability.csv", STABILITY_COLUMNS, table)

    def count(key: str) -> str:
        judged = [t[key] for t in table if t[key] is not None]
        open_ended = len(table) - len(judged)
        return f"{sum(judged)} of {len(judged)} columns" + (
            f" (and {open_ended} whose boundary lies outside its lrs: at the smallest already, or at none)"
            if open_ended else "")

    lines = ["", "## Stability: predicted vs observed largest lr", "",
             f"The sharpness at the start predicts the largest stable lr within one grid cell of the largest lr "
             f"below the first diverging one in {count('within_one_cell')}, and of the largest lr below the first "
             f"oscillating or diverging one in {count('instability_within_one_cell')}.", ""]
    return lines + markdown_table(STABILITY_COLUMNS, ([t[c] for c in STABILITY_COLUMNS] for t in table))


CROSSING_COLUMNS = ["optimizer", "tracked", "crossed", "then diverging", "then oscillating", "false alarms",
                    "misses", "started above", "started above: diverging", "started below: diverging"]


def _crossing_counts(runs: list[dict[str, Any]]) -> dict[str, int]:
    """The counts of :data:`CROSSING_COLUMNS` (but the optimizer) over ``runs``. A run "started above"
    when its first measurement, at step 0 (``curvature.log_spaced_start``), is above the threshold."""
    crossed = [r for r in runs if r["curvature"].get("first_crossing_step") is not None]
    outcome = Counter(r["regime"] for r in crossed)
    # A step-0 value that is missing or NaN (an unusable preconditioner) counts on neither side; where no run
    # was measured at step 0 (curvature.log_spaced_start=false) the three counts are empty, not 0.
    at_start = [r for r in runs if measured_at_start(r)]
    above = [r for r in at_start if r["curvature"]["initial_sharpness"] > r["curvature"]["initial_threshold"]]
    below = [r for r in at_start if r["curvature"]["initial_sharpness"] <= r["curvature"]["initial_threshold"]]
    started = {"started above": len(above), "started above: diverging": sum(r["regime"] == "diverging" for r in above),
               "started below: diverging": sum(r["regime"] == "diverging" for r in below)}
    return {"tracked": len(runs), "crossed": len(crossed), "then diverging": outcome["diverging"],
            "then oscillating": outcome["oscillating"],
            "false alarms": len(crossed) - outcome["diverging"] - outcome["oscillating"],
            "misses": sum(r["regime"] == "diverging" and r["curvature"].get("first_crossing_step") is None
                          for r in runs),
            **{key: value if at_start else None for key, value in started.items()}}


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
             f"{total['crossed']} of {total['tracked']} tracked runs crossed it, then labelled: diverging "
             f"{total['then diverging']}, oscillating {total['then oscillating']}, something else "
             f"{total['false alarms']} (false alarms, counting oscillating as none: "
             f"{total['crossed'] - total['then diverging']}). Diverging runs that never crossed it: {total['misses']}."]
    if leads:
        median = statistics.median(leads)
        lines.append(f"{len(leads)} crossing run(s) stopped on a non-finite value, the crossing "
                     f"{median:g} step{'' if median == 1 else 's'} before it (median; {leads[0]} to {leads[-1]}).")
    else:
        lines.append("No crossing run stopped on a non-finite value: no lead to measure.")
    by_setting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in tracked:
        by_setting[r["setting"]].append(r)  # as the map's panels
    lines += ["", "Per optimizer setting (started above / below: the first measurement, at step 0, above or below the "
              "threshold):", ""]
    table = []
    for setting, runs in sorted(by_setting.items(), key=lambda item: setting_key(item[0])):
        counts = _crossing_counts(runs)
        table.append([setting, *(counts[c] for c in CROSSING_COLUMNS[1:])])
    return lines + markdown_table(CROSSING_COLUMNS, table)


def disagreement_lines(cells: dict[tuple[str, str, float], MapCell]) -> list[str]:
    """report.md's section on the map cells whose runs (seeds) got different labels."""
    several = {key: c for key, c in cells.items() if sum(c.counts.values()) > 1}
    if not several:
        return []
    split = sorted(((key, c) for key, c in several.items() if not c.agreed),
                   key=lambda item: (setting_key(item[0][0]), width_key(item[0][1]), item[0][2]))
    if not split:
        cells = f"{len(several)} cell{'s' * (len(several) != 1)}"
        return ["", "## Regime map", "", f"{cells} of several runs; in each the runs (seeds) agree."]
    lines = ["", "## Regime map", "", f"{len(several)} cells of several runs; in {len(split)} of them the runs "
             "(seeds) disagree, marked * on the map, which shows the label most of them got (a tie: the label first "
             f"in the order {', '.join(PLOT_LABELS)}):"]
    lines += ["", *markdown_table(["optimizer", "widths", "lr", "shown", "regimes"],
                                  ([opt, widths, lr, c.regime, ", ".join(f"{label} {n}" for label, n in
                                                                        sorted(c.counts.items()))]
                                   for (opt, widths, lr), c in split))]
    return lines
