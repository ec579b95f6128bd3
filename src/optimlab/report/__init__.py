"""``optimlab-report <sweep dir>``: the runs' summary.json files -> tables and figures.

Writes next to the runs: ``report.md`` and ``report.csv`` (one row per run, crashed and
interrupted ones included), ``curves.png`` (per-run epoch curves titled with the diagnosed regime),
``lr_sensitivity.png`` (for lr sweeps), ``regime_map.png`` (for lr x width sweeps) and
``sharpness.png`` (for runs that tracked their sharpness, ``curvature.every_n_steps``). For an lr
sweep whose runs tracked their sharpness from step 0, ``stability.csv`` compares, per (optimizer, width) column (an
optimizer's *setting*, :func:`~optimlab.report.rows.name_settings`, where the sweep varies more than
lr, width and seed), the largest stable lr the sharpness at the start predicts with the largest lr
below the first diverging one; a regime map draws the prediction.
"""

from __future__ import annotations

import argparse
import csv
import errno
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from optimlab.files import remove_stale_temporaries
from optimlab.report.aggregate import map_cells, stability_table
from optimlab.report.figures import MAX_CURVES, plot_curves, plot_lr_sensitivity, plot_regime_map, plot_sharpness
from optimlab.report.rows import UnreadableRecord, find_runs, name_settings, on_lr_axis, row_for, tested_at_lr
from optimlab.report.tables import COLUMNS, crossing_lines, disagreement_lines, table_lines, write_csv, write_stability
from optimlab.summary import SUMMARY


class NoRuns(ValueError):
    """The folder holds no run to report."""


OUTPUTS = ("report.md", "report.csv", "curves.png", "lr_sensitivity.png", "sharpness.png", "stability.csv",
           "regime_map.png")  # everything report() may write


def report(sweep_dir: Path, rediagnose: bool = False) -> list[Path]:
    """Write the tables and the figures that fit this sweep; return the files written. They are made in a
    folder of their own first and moved into ``sweep_dir`` together once all are written: a report that
    fails (a full disk, a folder it may not write) leaves the earlier one as it was. ``report.md`` goes out
    first and comes in last, so that one killed while its files are moved in leaves no ``report.md`` beside
    a mix of the two reports' other files."""
    rows = [row_for(d, sweep_dir, rediagnose) for d in find_runs(sweep_dir)]
    if not rows:
        raise NoRuns(f"no runs (no {SUMMARY} or .hydra/ folders) under {sweep_dir}")
    name_settings(rows)
    for name in OUTPUTS:  # a folder where a file goes would stop the move in mid-way, the earlier report half replaced
        if (sweep_dir / name).is_dir():
            raise IsADirectoryError(errno.EISDIR, "a folder where the report's file goes", str(sweep_dir / name))
    remove_stale_temporaries(sweep_dir, "report")  # what a report killed mid-way left
    staging = sweep_dir / f".report.tmp{os.getpid()}"  # files.TEMPORARY's name for it
    staging.mkdir()
    try:
        write_report(rows, sweep_dir, staging, rediagnose)
        made = [name for name in OUTPUTS if (staging / name).exists()]
        (sweep_dir / "report.md").unlink(missing_ok=True)
        for name in OUTPUTS:  # what an earlier report wrote and this one does not would pass for this one's
            if name not in made:
                (sweep_dir / name).unlink(missing_ok=True)
        for name in sorted(made, key=lambda name: name == "report.md"):
            os.replace(staging / name, sweep_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [sweep_dir / name for name in made]


def write_report(rows: list[dict[str, Any]], sweep_dir: Path, out: Path, rediagnosed: bool = False) -> None:
    """The report of ``rows`` (the runs of ``sweep_dir``; ``rediagnosed``: labelled by the current rules) as files
    in ``out``."""
    write_csv(out / "report.csv", COLUMNS, rows)
    lines = table_lines(rows, sweep_dir)
    if rediagnosed:  # the labels can contradict the runs' own summaries
        lines[4:4] = ["Labels: diagnosed again with the current rules (--rediagnose), not those the runs' summaries "
                      "recorded.", ""]
    several_lrs = len({r["lr"] for r in rows if on_lr_axis(r)}) > 1
    if any(r["history"] for r in rows):
        plot_curves(rows, out / "curves.png")
        if (drawn := sum(1 for r in rows if r["history"])) > MAX_CURVES:
            lines += ["", f"curves.png draws the first {MAX_CURVES} of the {drawn} runs with curves, in the tables' "
                          f"order (sharpness.png at most {MAX_CURVES} too); the tables list them all."]
    if len({r["lr"] for r in tested_at_lr(rows)}) > 1:
        plot_lr_sensitivity(rows, out / "lr_sensitivity.png")
    if any(r.get("curvature") for r in rows):
        plot_sharpness(rows, out / "sharpness.png")
    tracked = any((r.get("curvature") or {}).get("measurements") for r in rows)
    if tracked:
        lines += crossing_lines(rows)
    stability = stability_table(rows) if several_lrs else []
    # an lr x width map: widths of one model kind (a CNN's channels are not an MLP's widths)
    models = sorted({r["model"] for r in rows if r.get("model")})
    regime_map = several_lrs and len({r["widths"] for r in rows if r.get("widths")}) > 1 and len(models) == 1
    if stability:
        lines += write_stability(stability, out)
        if not regime_map:
            lines += ["", "No regime map, so the predicted boundary is drawn nowhere: the map needs runs of several "
                          "widths of one model."]
    elif tracked:
        why = ("it needs runs at several lrs" if not several_lrs else
               "no run has a finite measurement at step 0 (curvature.log_spaced_start=false, or an unusable "
               "preconditioner)")
        lines += ["", f"No stability table (the largest stable lr the sharpness at the start predicts): {why}."]
    if several_lrs and len(models) > 1 and any(len({r.get("widths") for r in rows if r.get("model") == m}) > 1
                                               for m in models):
        lines += ["", f"No regime map: the runs are of {len(models)} models ({', '.join(models)}), whose widths share "
                      "no axis; report each model's runs from a folder of their own for its map."]
    cells = map_cells(rows) if regime_map else {}
    lines += disagreement_lines(cells)
    off_axis = [r["run"] for r in rows if r.get("lr") not in (None, "") and not on_lr_axis(r)]
    if several_lrs and off_axis:  # a refused job's lr=-1 or lr=abc: the figures' log lr axis has no place for it
        lines += ["", f"Not on the figures' lr axis (an lr that is not a positive number), only in the tables: "
                      f"{len(off_axis)} run{'s' * (len(off_axis) != 1)} ({', '.join(off_axis[:5])}"
                      f"{', ...' if len(off_axis) > 5 else ''})."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    if regime_map:
        plot_regime_map(cells, out / "regime_map.png", stability, models[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimlab-report", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("sweep_dir", help="a multirun directory (or any folder of runs)")
    parser.add_argument("--rediagnose", action="store_true",
                        help="label every run with the current diagnosis rules instead of its recorded regime")
    args = parser.parse_args(argv)
    if args.sweep_dir == "":  # Path("") is the working folder: an unset shell variable would report it
        print(f"error: sweep_dir: {args.sweep_dir!r} is not allowed; expected a folder of runs", file=sys.stderr)
        return 2
    args.sweep_dir = Path(args.sweep_dir)
    if not args.sweep_dir.is_dir():
        what = "is not a directory" if args.sweep_dir.exists() else "does not exist"
        print(f"error: {args.sweep_dir} {what}", file=sys.stderr)
        return 2
    try:
        written = report(args.sweep_dir, args.rediagnose)
    except (NoRuns, UnreadableRecord) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder it may not write: the earlier report stays
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: cannot write the report in {args.sweep_dir}: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    with (args.sweep_dir / "report.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    counts = Counter(r["regime"] for r in rows)
    try:
        print(f"{len(rows)} run{'s' * (len(rows) != 1)}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for path in written:
            print(f"wrote {path}")
        sys.stdout.flush()
    except BrokenPipeError:  # its reader left (| head -1): the report is written all the same
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    return 0
