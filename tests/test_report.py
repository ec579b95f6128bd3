"""The report command: tables with one row per run (crashed ones too), figures, seed aggregation."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from optimlab.report import main, report
from optimlab.report.aggregate import MapCell, map_cells
from optimlab.report.rows import plain_numbers, same_but_seed
from optimlab.summary import data_passes, validation_size


def fake_run(root: Path, name: str, optimizer: str, lr: float, width: int, seed: int, acc: float,
             regime: str = "healthy", decay: float = 0.0) -> None:
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": acc, "val_loss": 1.1 / e, "val_acc": acc - 0.01,
                "test_loss": 1.2 / e, "test_acc": acc - 0.02 + 0.005 * e} for e in (1, 2, 3)]
    summary = {"status": "complete", "config": {
        "name": "map", "lr": 0.1, "seed": seed, "model": {"_target_": "optimlab.models.MLP", "hidden": [width]},
        "optimizer": {"_target_": f"optimlab.optim.{optimizer}", "impl": "custom", "lr": lr, "weight_decay": decay}},
        "params": 1000 * width, "epochs": history, "test_acc": acc, "diverged": regime == "diverging",
        "regime": regime, "wall_time_s": 1.5, "steps_per_s": 100.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_no_regime_map_for_widths_of_different_models(tmp_path: Path) -> None:
    for n, lr in enumerate((0.01, 0.1)):
        fake_run(tmp_path, f"{2 * n}_mlp", "SGD", lr, 128, 0, 0.9)
        fake_run(tmp_path, f"{2 * n + 1}_cnn", "SGD", lr, 16, 0, 0.9)
        cnn = json.loads((tmp_path / f"{2 * n + 1}_cnn" / "summary.json").read_text())
        cnn["config"]["model"] = {"_target_": "optimlab.models.CNN", "channels": [12, 16]}
        (tmp_path / f"{2 * n + 1}_cnn" / "summary.json").write_text(json.dumps(cnn))
    assert "regime_map.png" not in {p.name for p in report(tmp_path)}
    assert "No regime map" not in (tmp_path / "report.md").read_text()  # neither model has a map of its own
    for n, lr in enumerate((0.01, 0.1)):
        fake_run(tmp_path, f"{4 + n}_mlp", "SGD", lr, 8, 0, 0.9)  # the MLP's widths 8 and 128: a map apart
    assert "regime_map.png" not in {p.name for p in report(tmp_path)}
    assert ("No regime map: the runs are of 2 models (cnn, mlp), whose widths share no axis"
            in (tmp_path / "report.md").read_text())  # not left out without a word (a probe)


def test_map_sweep_gets_every_table_and_figure(tmp_path: Path) -> None:
    n = 0
    for optimizer in ("SGD", "Adam"):
        for lr in (0.001, 0.1, 2.0):
            for width in (4, 128):
                for seed in (0, 1):
                    regime = "diverging" if lr == 2.0 else ("underfit" if width == 4 else "healthy")
                    fake_run(tmp_path, f"{n}_job", optimizer, lr, width, seed, 0.9 + 0.01 * seed, regime)
                    n += 1
    (tmp_path / f"{n}_crashed" / ".hydra").mkdir(parents=True)  # a job that died before its summary
    written = report(tmp_path)
    assert {p.name for p in written} == {"report.md", "report.csv", "curves.png", "lr_sensitivity.png",
                                         "regime_map.png"}
    assert all(p.stat().st_size > 0 for p in written)
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == n + 1
    crashed = [r for r in rows if r["run"] == f"{n}_crashed"]
    assert crashed and crashed[0]["status"] == "crashed" and crashed[0]["regime"] == "crashed"
    assert crashed[0]["error"] == "no summary.json (the job ended before writing one)"
    assert all(r["error"] == "" for r in rows if r["run"] != f"{n}_crashed")
    first = next(r for r in rows if r["run"] == "0_job")
    assert first["optimizer"] == "sgd" and first["widths"] == "4" and float(first["best_test_acc"]) == 0.895
    md = (tmp_path / "report.md").read_text()
    mean, std = statistics.fmean([0.9, 0.91]), 0.01 / 2**0.5  # the sample std of two (a probe: it was ddof=0)
    assert f"| map | mlp | adam | 0.1 | 128 | 2 | {mean:.4f} +/- {std:.4f} | healthy 2 |" in md


def test_cli_reports_counts_and_rejects_an_empty_folder(tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(tmp_path, "0_a", "SGD", 0.1, 128, 0, 0.97)
    fake_run(tmp_path, "1_b", "SGD", 2.0, 128, 0, 0.1, "diverging")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 runs: healthy 1, diverging 1" in out and "curves.png" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope'} does not exist"
    (tmp_path / "file").write_text("")
    assert main([str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'file'} is not a directory"
    fake_run(tmp_path / "cwd", "0_a", "SGD", 0.1, 128, 0, 0.97)
    monkeypatch.chdir(tmp_path / "cwd")  # an empty argument (an unset shell variable) had reported the working folder
    assert main([""]) == 2 and not (tmp_path / "cwd" / "report.md").exists()
    assert capsys.readouterr().err.strip() == "error: sweep_dir: '' is not allowed; expected a folder of runs"
    as_module = subprocess.run([sys.executable, "-m", "optimlab.report", str(tmp_path / "nope")], capture_output=True,
                               text=True)
    assert as_module.returncode == 2 and as_module.stderr.strip() == f"error: {tmp_path / 'nope'} does not exist"


def test_rediagnose_relabels_with_the_current_rules(tmp_path: Path) -> None:
    fake_run(tmp_path, "0_a", "SGD", 0.1, 128, 0, 0.97, regime="slow")  # a stale label
    assert main([str(tmp_path)]) == 0
    assert list(csv.DictReader((tmp_path / "report.csv").open()))[0]["regime"] == "slow"
    assert "--rediagnose" not in (tmp_path / "report.md").read_text()
    assert main([str(tmp_path), "--rediagnose"]) == 0
    assert list(csv.DictReader((tmp_path / "report.csv").open()))[0]["regime"] == "healthy"
    lines = (tmp_path / "report.md").read_text().splitlines()  # it says so (a probe: it looked like the other)
    assert lines[2:5] == ["1 run. Regimes: healthy 1", "", "Labels: diagnosed again with the current rules "
                          "(--rediagnose), not those the runs' summaries recorded."]


def test_lr_sensitivity_shows_the_seeds_spread_and_where_their_labels_disagree(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed means alone hid a 2 slow / 2 oscillating point (a probe): a bar over the runs, * where labels differ."""
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    for lr, regimes in ((0.1, ("healthy", "healthy")), (1.0, ("slow", "oscillating"))):
        for seed, (regime, acc) in enumerate(zip(regimes, (0.90, 0.70))):
            fake_run(tmp_path, f"{lr}_{seed}", "SGD", lr, 8, seed, acc, regime=regime)
    drawn: dict[str, Figure] = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.setdefault(Path(path).name, fig))
    report(tmp_path)
    ax = drawn["lr_sensitivity.png"].axes[0]
    bars = [segment for c in ax.collections if isinstance(c, LineCollection) for segment in c.get_segments()]
    assert sorted((x, lo, hi) for (x, lo), (_, hi) in bars) == [(-1.0, 0.7, 0.9), (0.0, 0.7, 0.9)]
    assert [(t.get_text(), t.xy) for t in ax.texts] == [("*", (0.0, pytest.approx(0.8)))]


def test_settings_are_ordered_by_their_numbers() -> None:
    """batch_size=128 came before batch_size=32, as text (a probe)."""
    from optimlab.report.rows import setting_key

    names = ["sgd (batch_size=128)", "adam", "sgd (batch_size=32)", "sgd (optimizer.weight_decay=0.01)",
             "sgd (optimizer.weight_decay=1e-05)", "sgd (batch_size=32, seed=10)", "sgd (batch_size=32, seed=9)"]
    assert sorted(names, key=setting_key) == [
        "adam", "sgd (batch_size=32)", "sgd (batch_size=32, seed=9)", "sgd (batch_size=32, seed=10)",
        "sgd (batch_size=128)", "sgd (optimizer.weight_decay=1e-05)", "sgd (optimizer.weight_decay=0.01)"]
    # a hyphen in a name is no minus sign; one number written two ways: one order, whatever the set's (a review)
    assert sorted(["run-10", "run-2", "x=.5", "x=0.25", "lr=-1", "lr=-3"], key=setting_key) == [
        "lr=-3", "lr=-1", "run-2", "run-10", "x=0.25", "x=.5"]
    assert sorted({"w=0.00001", "w=1e-05"}, key=setting_key) == ["w=0.00001", "w=1e-05"]


def test_the_findings_name_each_labels_lrs_and_the_seed_table_counts_seeds(tmp_path: Path) -> None:
    """A label at lrs 0.3 and 3 with another at 1 between them read "0.3 to 3"; a refused job at lr 0 was left
    out; a seed listed twice counted as two seeds (a probe)."""
    for lr, regime in ((0.3, "slow"), (1.0, "healthy"), (3.0, "slow"), (10.0, "slow")):
        fake_run(tmp_path, f"{lr}", "SGD", lr, 8, 0, 0.9, regime=regime)
    fake_run(tmp_path, "zero", "SGD", 0.0, 8, 0, 0.9)
    path = tmp_path / "zero" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "crashed", "epochs": [], "test_acc": None,
                                "regime": None, "error": "ConfigError: lr: 0 is not allowed"}))
    for name, seed, acc in (("a", 0, 0.90), ("b", 0, 0.90), ("c", 1, 0.80)):  # seed 0 twice
        fake_run(tmp_path, name, "Adam", 0.01, 8, seed, acc)
    report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "**slow** in sgd 8 at lr 0.3, 3 to 10." in text and "**crashed** in sgd 8 at lr 0." in text
    assert "| map | mlp | adam | 0.01 | 8 | 2 | 0.8500 +/- 0.0707 | healthy 3 |" in text


def test_rediagnosing_a_run_whose_recorded_thresholds_are_not_allowed_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_run(tmp_path, "0_a", "SGD", 0.1, 128, 0, 0.97)
    assert main([str(tmp_path)]) == 0
    before = (tmp_path / "report.csv").read_text()
    path = tmp_path / "0_a" / "summary.json"
    summary = json.loads(path.read_text())
    summary["config"]["regimes"] = {"window": 0}  # edited by hand: no run accepts it
    path.write_text(json.dumps(summary))
    capsys.readouterr()
    assert main([str(tmp_path), "--rediagnose"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {path}: regimes.window: 0 is not allowed; expected an "
                                               "integer >= 1")
    assert (tmp_path / "report.csv").read_text() == before  # nothing written or removed


def test_rediagnosing_leaves_a_run_that_never_trained_as_it_ended(tmp_path: Path) -> None:
    """A job refused for its thresholds (its row: crashed) does not stop the rediagnosis of the others (a probe)."""
    fake_run(tmp_path, "0_a", "SGD", 0.1, 128, 0, 0.97)
    (tmp_path / "1_b").mkdir()
    (tmp_path / "1_b" / "summary.json").write_text(json.dumps({
        "status": "crashed", "config": {"lr": 0.1, "regimes": {"fit_acc": -1}}, "epochs": [], "regime": None,
        "error": "ConfigError: regimes.fit_acc: -1 is not allowed; expected a number in [0, 1]"}))
    assert main([str(tmp_path), "--rediagnose"]) == 0
    regimes = {r["run"]: r["regime"] for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert regimes == {"0_a": "healthy", "1_b": "crashed"}


def test_seeds_are_aggregated_only_over_otherwise_equal_configs(tmp_path: Path) -> None:
    # Same optimizer, lr and width; two weight decays, two seeds each: two groups, never one of four.
    for i, (decay, seed, acc) in enumerate([(0.0, 0, 0.90), (0.0, 1, 0.92), (1e-4, 0, 0.80), (1e-4, 1, 0.84)]):
        fake_run(tmp_path, f"{i}_job", "SGD", 0.1, 128, seed, acc, decay=decay)
    report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    for accs in ([0.90, 0.92], [0.80, 0.84]):
        mean, std = statistics.fmean(accs), statistics.stdev(accs)
        assert f"| 2 | {mean:.4f} +/- {std:.4f} |" in md
    assert "| 4 |" not in md
    # How a run was launched is not the experiment: the population launcher's plan, or none recorded.
    base = {"seed": 0, "lr": 0.1, "population": {"max_members": 64, "dry_run": False}}
    assert same_but_seed(base) == same_but_seed({**base, "seed": 1, "population": {"max_members": 8}}) \
        == same_but_seed({"seed": 2, "lr": 0.1})
    assert same_but_seed(base) != same_but_seed({**base, "lr": 0.2})


def test_a_sweep_of_data_seeds_alone_is_aggregated_over_them(tmp_path: Path) -> None:
    """``data.seed=0,1,2`` at one ``seed``: three seeds of one experiment in the seed table (it had shown none)."""
    accs = (0.90, 0.92, 0.97)
    for data_seed, acc in enumerate(accs):
        fake_run(tmp_path, f"{data_seed}_job", "SGD", 0.1, 128, 0, acc)
        path = tmp_path / f"{data_seed}_job" / "summary.json"
        summary = json.loads(path.read_text())
        summary["config"]["data"] = {"seed": data_seed, "val_size": 5000}
        path.write_text(json.dumps(summary))
    fake_run(tmp_path, "older", "SGD", 0.1, 128, 0, accs[0])  # a record without data.seed: its data seed is its seed
    path = tmp_path / "older" / "summary.json"
    path.write_text(json.dumps({**(summary := json.loads(path.read_text())),
                                "config": {**summary["config"], "data": {"val_size": 5000}}}))
    report(tmp_path)
    assert f"| 3 | {statistics.fmean(accs):.4f} +/- {statistics.stdev(accs):.4f} |" in (tmp_path / "report.md").read_text()


def test_a_report_that_cannot_be_written_is_one_line_and_keeps_the_earlier_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe's full disk: the figure's write failed with a traceback after the earlier report.md had been
    deleted. Now the files are made apart and moved in together, or not at all."""
    import errno

    import optimlab.report

    for n, lr in enumerate((0.1, 1.0)):
        fake_run(tmp_path, f"{n}_run", "SGD", lr, 8, 0, 0.97)
    assert main([str(tmp_path)]) == 0
    earlier = {name: (tmp_path / name).read_bytes() for name in ("report.md", "report.csv", "curves.png")}

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(optimlab.report, "plot_curves", full)
    (tmp_path / "1_run" / "summary.json").write_text("{}")  # this report would differ
    capsys.readouterr()
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: cannot write the report in {tmp_path}: No space left on device\n"
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["0_run", "1_run", *earlier, "lr_sensitivity.png"])


def test_a_folder_where_a_report_file_goes_keeps_the_earlier_report(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A probe: a folder named curves.png stopped the move in mid-way, report.md gone and the csv replaced."""
    for n, lr in enumerate((0.1, 1.0)):
        fake_run(tmp_path, f"{n}_run", "SGD", lr, 8, 0, 0.97)
    assert main([str(tmp_path)]) == 0
    earlier = {name: (tmp_path / name).read_bytes() for name in ("report.md", "report.csv")}
    (tmp_path / "curves.png").unlink()
    (tmp_path / "curves.png").mkdir()
    (tmp_path / "1_run" / "summary.json").write_text("{}")  # this report would differ
    capsys.readouterr()
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: cannot write the report in {tmp_path}: a folder where the report's "
                                       f"file goes ({tmp_path / 'curves.png'})\n")
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier
    assert not list(tmp_path.glob(".report.tmp*"))


def test_a_report_stopped_while_its_files_are_moved_in_leaves_no_report_md(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill probe (a slow disk): killed between moving its files in, a report had left the new report.md beside
    the earlier report.csv and figures. report.md now goes out first and comes in last."""
    import optimlab.report

    for n, lr in enumerate((0.1, 1.0)):
        fake_run(tmp_path, f"{n}_run", "SGD", lr, 8, 0, 0.97)
    report(tmp_path)
    moved, real_replace = [], os.replace

    def replace_then_stop(source: Path, target: Path) -> None:
        if len(moved) == 1:
            raise KeyboardInterrupt
        moved.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(optimlab.report.os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        report(tmp_path)
    assert moved and "report.md" not in moved and not (tmp_path / "report.md").exists()


def test_a_job_folder_linked_into_the_sweep_is_reported_once(tmp_path: Path) -> None:
    """A probe's sweep with one job's folder moved away and linked back: it was left out without a word."""
    sweep = tmp_path / "sweep"
    for n, lr in enumerate((0.1, 1.0)):
        fake_run(sweep, f"{n}_run", "SGD", lr, 8, 0, 0.97)
    (sweep / "1_run").rename(tmp_path / "elsewhere")
    (sweep / "1_run").symlink_to(tmp_path / "elsewhere")
    (sweep / "loop").symlink_to(sweep)  # links to folders that are not runs: not followed (they may hold other sweeps)
    (sweep / "up").symlink_to(tmp_path)
    report(sweep)
    assert [r["run"] for r in csv.DictReader((sweep / "report.csv").open())] == ["0_run", "1_run"]


def test_what_a_killed_report_left_is_removed_by_the_next(tmp_path: Path) -> None:
    """Its files are made in .report.tmp<pid>: a folder of a process that is gone is removed (a review), one of a
    running process (another report writing now) stays."""
    for n, lr in enumerate((0.1, 1.0)):
        fake_run(tmp_path, f"{n}_run", "SGD", lr, 8, 0, 0.97)
    gone, alive = tmp_path / ".report.tmp999999999", tmp_path / f".report.tmp{os.getppid()}"
    for folder in (gone, alive):
        folder.mkdir()
        (folder / "report.md").write_text("half")
    report(tmp_path)
    assert not gone.exists() and alive.is_dir()
    assert sorted(p.name for p in tmp_path.glob(".report.tmp*")) == [alive.name]


def test_a_sharpness_record_without_a_threshold_formula_is_read(tmp_path: Path) -> None:
    """SGD with dampening 1 has no finite threshold: its formula is null (a review: such a summary was unreadable)."""
    fake_run(tmp_path, "0_run", "SGD", 0.1, 8, 0, 0.97)
    path = tmp_path / "0_run" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "curvature": {
        "measurements": 1, "series": [[0, 1.0, None]], "threshold_formula": None, "initial_threshold": None}}))
    from optimlab.summary import read_summary

    assert read_summary(path.parent) is not None


@pytest.mark.parametrize("edit", [{"epochs": "oops"}, {"epochs": [1, 2]}, {"config": []}, {"train_steps": [{"a": "b"}]},
                                  {"curvature": {"measurements": "x", "series": 5}}, {"curvature": [1]},
                                  {"epochs": [{"epoch": 1, "val_acc": "high"}]}, {"status": "crashed", "error": 5},
                                  {"regime": ["x"]}, {"curvature": {"measurements": 1, "series": [[0, "a", 2]]}},
                                  {"status": "done"}, {"status": 3}, {"epochs": [{"val_acc": 0.5}]},
                                  {"config": {"optimizer": 3}}, {"config": {"model": {"hidden": 3}}},
                                  {"curvature": {"measurements": 1, "series": [], "initial_threshold": "x"}},
                                  {"curvature": {"measurements": 1, "series": [], "threshold_formula": 2}},
                                  {"diverged_at_step": "3"}, {"test_acc": "0.5"}, {"diverged": "no"},
                                  {"config": {"seed": [1]}}])
def test_a_summary_of_another_shape_is_unreadable_not_a_traceback(tmp_path: Path, edit: dict) -> None:
    """Valid JSON whose fields are not the schema's (a probe: AttributeError, TypeError from the figures)."""
    for n, lr in enumerate((0.1, 1.0)):
        fake_run(tmp_path, f"{n}_run", "SGD", lr, 8, 0, 0.97)
    path = tmp_path / "1_run" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    assert main([str(tmp_path)]) == 0
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert rows["1_run"]["error"] == "summary.json unreadable" and rows["0_run"]["regime"] == "healthy"
    assert rows["1_run"]["regime"] == "unreadable"


def test_a_finished_run_recorded_without_its_label_is_diagnosed_from_its_history(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for seed in (0, 1):
        fake_run(tmp_path, f"{seed}_run", "SGD", 0.1, 8, seed, 0.97)
    path = tmp_path / "1_run" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "regime": None}))
    assert main([str(tmp_path)]) == 0
    assert [row["regime"] for row in csv.DictReader((tmp_path / "report.csv").open())] == ["healthy", "healthy"]
    assert capsys.readouterr().out.startswith("2 runs: healthy 2\n")


def test_the_recorded_lr_is_the_optimizers(tmp_path: Path) -> None:
    fake_run(tmp_path, "0_a", "SGD", 0.5, 128, 0, 0.97)  # the config's top-level lr is 0.1
    report(tmp_path)
    assert list(csv.DictReader((tmp_path / "report.csv").open()))[0]["lr"] == "0.5"


def test_sharpness_is_drawn_from_each_records_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sharpness.png: every measurement a record holds (no TensorBoard events needed), a non-finite
    one (null in the record) a gap; a run that tracked nothing, or whose measurements were never
    finite (a log axis without a value crashed the report), gets no panel."""
    from matplotlib.axes import Axes

    series = {"0_tracked": [[0, 20.0, 40.0], [5, 30.0, 40.0], [10, None, 40.0]], "1_untracked": [],
              "2_once": [[4, 7.0, None]],  # one measurement, no threshold (an optimizer without one)
              "3_never_finite": [[0, None, None], [3, None, None]]}  # nothing a log axis can show
    for seed, (name, rows) in enumerate(series.items()):
        fake_run(tmp_path, name, "SGD", 0.05, 8, seed, 0.9)
        path = tmp_path / name / "summary.json"
        summary = json.loads(path.read_text())
        summary["curvature"] = {"measurements": len(rows), "first_crossing_step": None, "series": rows,
                                "threshold_formula": "2/lr"}
        path.write_text(json.dumps(summary))
    drawn: list[tuple[list[float], list[float]]] = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, x, y, *args, **kwargs: drawn.append((list(x), list(y)))
                        or plot(ax, x, y, *args, **kwargs))
    assert tmp_path / "sharpness.png" in report(tmp_path)
    sharpness = next(ys for xs, ys in drawn if xs == [0, 5, 10] and ys[0] == 20.0)
    assert sharpness[1] == 30.0 and math.isnan(sharpness[2])
    assert ([0, 5, 10], [40.0, 40.0, 40.0]) in drawn
    assert not any(xs == [] for xs, _ in drawn)
    assert [ys for xs, ys in drawn if xs == [4]] == [[7.0]]  # its point, and no threshold line
    assert not any(xs == [0, 3] for xs, _ in drawn)


def test_the_report_and_the_diagnosis_import_no_torch() -> None:
    """optimlab-report reads records: it starts in a fraction of a second, not after torch's and
    Lightning's imports (about 6 s on the 2-core CPU)."""
    code = ("import sys, optimlab.report, optimlab.regimes; "
            "print([m for m in ('torch', 'lightning', 'tensorboard') if m in sys.modules])")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_stability_compares_the_predicted_and_observed_largest_stable_lr(tmp_path: Path) -> None:
    lrs = (0.001, 0.01, 0.1, 1.0)
    for width, sharpness0, diverging_from in ((8, 20.0, 1.0), (32, 2000.0, 1.0)):
        for lr in lrs:
            for seed in (0, 1):
                name = f"w{width}_lr{lr}_s{seed}"
                regime = "diverging" if lr >= diverging_from else "oscillating" if lr == 0.1 and width == 8 else "healthy"
                fake_run(tmp_path, name, "SGD", lr, width, seed, 0.9, regime)
                path = tmp_path / name / "summary.json"
                summary = json.loads(path.read_text())
                summary["curvature"] = {"measurements": 3, "initial_step": 0, "initial_sharpness": sharpness0 + seed,
                                        "initial_threshold": 2 / lr, "first_crossing_step": None}
                path.write_text(json.dumps(summary))
    written = report(tmp_path)
    assert tmp_path / "stability.csv" in written and tmp_path / "regime_map.png" in written
    assert tmp_path / "sharpness.png" not in written  # no record holds a series of measurements
    table = list(csv.DictReader((tmp_path / "stability.csv").open()))
    assert [(t["width"], t["within_one_cell"]) for t in table] == [("8", "True"), ("32", "False")]
    assert float(table[0]["sharpness0"]) == 20.5 and abs(float(table[0]["predicted_max_lr"]) - 2 / 20.5) < 1e-12
    assert float(table[1]["observed_max_lr_without_divergence"]) == 0.1
    # Width 8 oscillates from lr 0.1: the largest lr before instability is 0.01, within one cell of 2/20.5.
    assert [float(t["observed_max_lr_before_instability"]) for t in table] == [0.01, 0.1]
    assert [t["instability_within_one_cell"] for t in table] == ["True", "False"]
    text = (tmp_path / "report.md").read_text()
    assert ("within one grid cell of the largest lr below the first diverging one in 1 of 2 columns, and of the largest lr "
            "below the first oscillating or diverging one in 1 of 2 columns.") in text
    assert "0 of 16 tracked runs crossed it" in text and "Diverging runs that never crossed it: 4." in text
    for run in tmp_path.glob("w*"):  # one lr left: no stability table, no map; the old ones go
        if "_lr0.001_" not in run.name:
            shutil.rmtree(run)
    written = report(tmp_path)
    assert not any((tmp_path / name).exists() for name in ("stability.csv", "regime_map.png", "lr_sensitivity.png"))
    assert all(path.exists() for path in written) and tmp_path / "report.md" in written


def test_the_map_marks_a_predicted_boundary_beyond_its_lrs_at_that_edge(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A width whose predicted largest stable lr lies below or above the grid's lrs gets an arrow at that edge
    (it had been left out of the figure), one within them a bar at its place."""
    from matplotlib.figure import Figure

    lrs = (0.01, 0.1, 1.0)
    for width, sharpness0 in ((2, 1e-3), (8, 20.0), (32, 1e6), (64, 0.0)):  # 2/lr = sharpness0 at 2e3, 0.1, 2e-6, inf
        for lr in lrs:
            fake_run(tmp_path, f"w{width}_lr{lr}", "SGD", lr, width, 0, 0.9, "diverging" if lr == 1.0 else "healthy")
            path = tmp_path / f"w{width}_lr{lr}" / "summary.json"
            summary = json.loads(path.read_text())
            summary["curvature"] = {"measurements": 3, "initial_step": 0, "initial_sharpness": sharpness0,
                                    "initial_threshold": 2 / lr, "first_crossing_step": None}
            path.write_text(json.dumps(summary))
    drawn: dict[str, Figure] = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.setdefault(Path(path).name, fig))
    report(tmp_path)
    marks = {(line.get_marker(), tuple(line.get_xdata()), tuple(line.get_ydata()))
             for line in drawn["regime_map.png"].axes[0].lines}
    assert marks == {(">", (2.5,), (0,)), ("None", (1.0, 1.0), (0.55, 1.45)), ("<", (-0.5,), (2,)), (">", (2.5,), (3,))}
    legend = [text.get_text() for text in drawn["regime_map.png"].legends[0].get_texts()]
    assert legend[-1] == "predicted largest stable lr (an arrow: beyond the grid)"
    for width in (2, 32, 64):  # every prediction within the lrs: bars only, and the legend says no more
        for lr in lrs:
            path = tmp_path / f"w{width}_lr{lr}" / "summary.json"
            summary = json.loads(path.read_text())
            summary["curvature"]["initial_sharpness"] = 2.0
            path.write_text(json.dumps(summary))
    drawn.clear()
    report(tmp_path)
    assert {line.get_marker() for line in drawn["regime_map.png"].axes[0].lines} == {"None"}
    assert drawn["regime_map.png"].legends[0].get_texts()[-1].get_text() == "predicted largest stable lr"


def test_stability_judges_each_column_on_its_own_lrs_and_leaves_open_ones_out(tmp_path: Path) -> None:
    """A reviewer's cases: untracked runs of another optimizer at other lrs changed a column's verdict (the
    cells were every lr in the folder), and a column in which nothing diverged counted its top lr as the
    observed boundary, a hit, where the boundary lies above the grid."""
    for width, diverging_from in ((8, 1.0), (16, math.inf)):
        for lr in (0.01, 0.1, 1.0):
            name = f"w{width}_lr{lr}"
            fake_run(tmp_path, name, "SGD", lr, width, 0, 0.9, "diverging" if lr >= diverging_from else "healthy")
            path = tmp_path / name / "summary.json"
            summary = json.loads(path.read_text())
            summary["curvature"] = {"measurements": 3, "initial_step": 0, "initial_sharpness": 4.0,
                                    "initial_threshold": 2 / lr, "first_crossing_step": None}
            path.write_text(json.dumps(summary))
    report(tmp_path)
    before = list(csv.DictReader((tmp_path / "stability.csv").open()))
    # Width 8: predicted 2/4 = 0.5, observed 0.1: within one of its cells. Width 16 never diverged: open.
    assert [(t["width"], t["within_one_cell"], t["instability_within_one_cell"]) for t in before] == [
        ("8", "True", "True"), ("16", "", "")]
    text = (tmp_path / "report.md").read_text()
    assert "below the first diverging one in 1 of 1 columns (and 1 whose boundary lies outside its lrs: at the " \
           "smallest already, or at none)" in text
    for lr in (1.2, 1.5, 2.0, 2.5):  # another optimizer, untracked, at lrs of its own
        fake_run(tmp_path, f"adam_lr{lr}", "Adam", lr, 8, 0, 0.9)
    report(tmp_path)
    assert list(csv.DictReader((tmp_path / "stability.csv").open())) == before


def tracked_column(root: Path, width: int, regimes: dict[float, str], sharpness0: float = 10.0,
                   initial_step: int = 0) -> None:
    """One SGD run per lr of ``regimes`` at ``width``, its first measurement ``sharpness0`` at ``initial_step``."""
    for lr, regime in regimes.items():
        fake_run(root, f"w{width}_lr{lr}", "SGD", lr, width, 0, 0.9, regime)
        path = root / f"w{width}_lr{lr}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["curvature"] = {"measurements": 3, "initial_step": initial_step, "initial_sharpness": sharpness0,
                                "initial_threshold": 2 / lr, "first_crossing_step": None}
        path.write_text(json.dumps(summary))


def test_stability_leaves_a_boundary_below_the_grid_open_and_reads_a_column_from_its_smallest_lr(tmp_path: Path) -> None:
    """A probe's cases: a column diverging at every lr (predicted 2/10 = 0.2, below its lrs 30 and 100) was
    counted a miss, though its boundary lies below the grid, as a never-diverging column's lies above it;
    a column slow, diverging, slow, slow from lr 0.01 up gave 10, above the diverging 0.1, as its largest
    lr without divergence (predicted 2/100: within one cell of 0.01); and a column first measured at step 5 is
    not the sharpness at initialisation."""
    tracked_column(tmp_path, 8, {30.0: "diverging", 100.0: "diverging"})
    tracked_column(tmp_path, 16, {0.01: "slow", 0.1: "diverging", 1.0: "slow", 10.0: "slow"}, sharpness0=100.0)
    tracked_column(tmp_path, 32, {0.01: "healthy", 0.1: "healthy"}, initial_step=5)
    report(tmp_path)
    table = list(csv.DictReader((tmp_path / "stability.csv").open()))
    assert [(t["width"], t["observed_max_lr_without_divergence"], t["within_one_cell"],
             t["observed_max_lr_before_instability"], t["instability_within_one_cell"]) for t in table] == [
        ("8", "", "", "", ""), ("16", "0.01", "True", "0.01", "True")]
    assert "below the first diverging one in 1 of 1 columns (and 1 whose boundary lies outside its lrs" in \
        (tmp_path / "report.md").read_text()


def test_the_report_says_when_curves_png_draws_only_some_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimlab.report import figures

    monkeypatch.setattr(figures, "MAX_CURVES", 2)
    monkeypatch.setattr("optimlab.report.MAX_CURVES", 2)
    for n, lr in enumerate((0.01, 0.1)):
        fake_run(tmp_path, f"{n}_run", "SGD", lr, 8, 0, 0.9)
    report(tmp_path)
    assert "curves.png draws the first" not in (tmp_path / "report.md").read_text()
    fake_run(tmp_path, "2_run", "SGD", 1.0, 8, 0, 0.9)
    report(tmp_path)
    assert "curves.png draws the first 2 of the 3 runs with curves" in (tmp_path / "report.md").read_text()


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """``optimlab-report <dir> | head -1``: the pipe closed before its lines (a probe: BrokenPipeError)."""
    import subprocess
    import sys

    for n, lr in enumerate((0.01, 0.1)):
        fake_run(tmp_path, f"{n}_run", "SGD", lr, 8, 0, 0.9)
    process = subprocess.Popen([sys.executable, "-m", "optimlab.report", str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # type: ignore[union-attr]
    stderr = process.stderr.read().decode()  # type: ignore[union-attr]
    assert process.wait() == 0 and stderr == "" and (tmp_path / "report.md").is_file()


def test_stability_counts_a_tie_of_two_seeds_as_diverging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # lr 1: one seed diverging (listed first), one healthy: a tie, which the map shows as healthy*; half the
    # seeds diverged there, so the largest lr without divergence is 0.1 (it was 1, read off the map; a probe)
    import matplotlib.axes

    from optimlab.report.figures import REGIME_COLORS

    colors = []  # of lr_sensitivity.png's points
    scatter = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda ax, *a, **k: colors.append(k["color"]) or scatter(ax, *a, **k))
    n = 0
    for lr in (0.1, 1.0):
        for seed, regime in ((0, "diverging" if lr == 1.0 else "healthy"), (1, "healthy")):
            fake_run(tmp_path, f"{n}_job", "SGD", lr, 8, seed, 0.9, regime)
            path = tmp_path / f"{n}_job" / "summary.json"
            summary = json.loads(path.read_text())
            summary["curvature"] = {"measurements": 1, "initial_step": 0, "initial_sharpness": 20.0,
                                    "initial_threshold": 2 / lr, "first_crossing_step": None}
            path.write_text(json.dumps(summary))
            n += 1
    fake_run(tmp_path, f"{n}_job", "SGD", 0.1, 64, 0, 0.9)  # a second width: a map is drawn
    report(tmp_path)
    table = list(csv.DictReader((tmp_path / "stability.csv").open()))
    assert [(t["width"], float(t["observed_max_lr_without_divergence"]), t["within_one_cell"]) for t in table] == \
        [("8", 0.1, "True")]  # predicted 2 / 20 = 0.1
    assert "| sgd | 8 | 1 | healthy | diverging 1, healthy 1 |" in (tmp_path / "report.md").read_text()
    # the tie coloured as the map shows it, not by the first run's label (a probe: red beside a healthy cell)
    assert REGIME_COLORS["healthy"] in colors and REGIME_COLORS["diverging"] not in colors


def test_the_report_says_why_a_tracked_sweep_has_no_stability_table_or_boundary(tmp_path: Path) -> None:
    """A tracked sweep of one lr, or of runs first measured after step 0, gets no stability table, and one of
    one width no regime map to draw the prediction on: report.md says so (it said nothing; a probe); without a
    measurement at step 0 the started-above/below counts are empty, not 0."""
    tracked_column(tmp_path / "one_lr", 8, {0.1: "healthy"})
    tracked_column(tmp_path / "one_lr", 16, {0.1: "healthy"})
    report(tmp_path / "one_lr")
    assert "No stability table (the largest stable lr the sharpness at the start predicts): it needs runs at " \
           "several lrs." in (tmp_path / "one_lr" / "report.md").read_text()
    tracked_column(tmp_path / "later", 8, {0.1: "healthy", 1.0: "diverging"}, initial_step=5)
    report(tmp_path / "later")
    text = (tmp_path / "later" / "report.md").read_text()
    assert "no run has a finite measurement at step 0 (curvature.log_spaced_start=false, or an unusable " \
           "preconditioner)." in text
    assert "| sgd | 2 | 0 | 0 | 0 | 0 | 1 |  |  |  |" in text  # tracked, crossed, ..., misses; started: empty
    tracked_column(tmp_path / "one_width", 8, {0.1: "healthy", 1.0: "diverging"})
    written = report(tmp_path / "one_width")
    assert tmp_path / "one_width" / "stability.csv" in written and tmp_path / "one_width" / "regime_map.png" not in written
    assert "No regime map, so the predicted boundary is drawn nowhere: the map needs runs of several widths of one " \
           "model." in \
        (tmp_path / "one_width" / "report.md").read_text()


def test_report_counts_crossings_false_alarms_and_leads(tmp_path: Path) -> None:
    """Crossed and diverged at step 7 (lead 5), crossed and oscillating, crossed and healthy (a false
    alarm), diverging without a crossing (a miss), never crossed and healthy."""
    for name, regime, crossing, stopped in (("a", "diverging", 2, 7), ("b", "oscillating", 3, None),
                                            ("c", "healthy", 0, None), ("d", "diverging", None, None),
                                            ("e", "healthy", None, None)):
        fake_run(tmp_path, name, "SGD", 0.1, 8, 0, 0.9, regime)
        path = tmp_path / name / "summary.json"
        summary = json.loads(path.read_text())
        summary["curvature"] = {"measurements": 4, "initial_step": 0, "first_crossing_step": crossing,
                                "initial_sharpness": 30.0 if crossing == 0 else 3.0, "initial_threshold": 20.0}
        summary["diverged_at_step"] = stopped
        path.write_text(json.dumps(summary))
    fake_run(tmp_path, "f", "Adam", 0.1, 8, 0, 0.9, "diverging")  # started above 38/lr at step 0, and diverged
    path = tmp_path / "f" / "summary.json"
    summary = json.loads(path.read_text())
    summary["curvature"] = {"measurements": 2, "initial_step": 0, "initial_sharpness": 500.0,
                            "initial_threshold": 380.0, "first_crossing_step": 0}
    path.write_text(json.dumps(summary))
    fake_run(tmp_path, "g", "Adam", 0.1, 8, 1, 0.9, "diverging")  # no usable step-0 value: on neither side
    path = tmp_path / "g" / "summary.json"
    summary = json.loads(path.read_text())
    summary["curvature"] = {"measurements": 2, "initial_step": 0, "initial_sharpness": None,
                            "initial_threshold": 380.0, "first_crossing_step": None}
    path.write_text(json.dumps(summary))
    report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert ("4 of 7 tracked runs crossed it, then labelled: diverging 2, oscillating 1, something else 1 (false "
            "alarms, counting oscillating as none: 2). Diverging runs that never crossed it: 2.") in text
    assert "1 crossing run(s) stopped on a non-finite value, the crossing 5 steps before it (median; 5 to 5)." in text
    # SGD: c started above (a false alarm); d diverged from below. Adam: f started above and diverged.
    assert "| adam | 2 | 1 | 1 | 0 | 0 | 1 | 1 | 1 | 0 |" in text
    assert "| sgd | 5 | 3 | 1 | 1 | 1 | 1 | 1 | 0 | 2 |" in text
    # Per setting, as the map's panels: an SGD with weight decay is a row of its own (it was merged into sgd's).
    fake_run(tmp_path, "h", "SGD", 0.1, 8, 0, 0.9, "healthy", decay=0.01)
    path = tmp_path / "h" / "summary.json"
    summary = json.loads(path.read_text())
    summary["curvature"] = {"measurements": 2, "initial_step": 0, "initial_sharpness": 1.0,
                            "initial_threshold": 20.0, "first_crossing_step": None}
    path.write_text(json.dumps(summary))
    report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| sgd (optimizer.weight_decay=0) | 5 | 3 | 1 | 1 | 1 | 1 | 1 | 0 | 2 |" in text
    assert "| sgd (optimizer.weight_decay=0.01) | 1 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 |" in text


def test_report_md_states_the_command_and_where_each_regime_appeared(tmp_path: Path) -> None:
    for lr, regime in ((0.01, "healthy"), (0.1, "healthy"), (1.0, "diverging")):
        fake_run(tmp_path, f"lr{lr}", "SGD", lr, 8, 0, 0.9, regime)
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    hydra: [hydra.mode=MULTIRUN, hydra.sweep.dir=x]\n"
                                            "    task: ['lr=0.01,0.1,1.0', 'model.hidden=[8]', 'seed=${hydra:job.num}']\n")
    report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "Command: `python train.py -m hydra.sweep.dir=x lr=0.01,0.1,1.0 model.hidden=[8] seed=${hydra:job.num}`" in text
    assert "What this sweep shows: **healthy** in sgd 8 at lr 0.01 to 0.1. **diverging** in sgd 8 at lr 1." in text
    assert "| final_train_acc | best_train_acc | final_val_acc | best_val_acc | final_test_acc |" in text


@pytest.mark.parametrize("sweeper, task, launched", [
    ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "['lr=0.01,0.1,1.0', 'model.hidden=[8]']", 6),
    ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "['lr=0.01,0.1,1.0', 'optimizer=sgd']", 3),
    ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "['lr=0.01', 'optimizer=sgd']", 1),  # two commands
    ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "['lr=range(1,4)', 'seed=choice(0,1)']", 12),
    ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "['lr=interval(0,1)']", None),
    ("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "['lr=0.01,0.1,1.0']", None)])
def test_report_md_counts_the_jobs_a_stopped_or_shared_sweep_folder_misses(tmp_path: Path, sweeper: str, task: str,
                                                                 launched: int | None) -> None:
    for lr in (0.01, 0.1, 1.0):
        fake_run(tmp_path, f"lr{lr}", "SGD", lr, 8, 0, 0.9)
    # the sweep config's params, replaced where the command gives the key again (Hydra's basic sweeper)
    (tmp_path / "multirun.yaml").write_text(f"hydra:\n  sweeper:\n    _target_: {sweeper}\n    params:\n"
                                            f"      optimizer: sgd,adam\n      lr: 0.5,0.6\n"
                                            f"  overrides:\n    hydra: []\n    task: {task}\n")
    report(tmp_path)
    head = (tmp_path / "report.md").read_text().splitlines()[2]
    if launched is None or launched == 3:
        assert head.startswith("3 runs. Regimes: healthy 3")
    elif launched < 3:
        assert head.startswith(f"3 runs (its command, below, makes {launched}; {3 - launched} of the folder's runs are "
                               "of other commands). Regimes: healthy 3")
    else:
        assert head.startswith(f"3 runs of its command's {launched} jobs ({launched - 3} never started: no record).")


@pytest.mark.parametrize("command, head", [
    ("['lr=0.3,0.5,0.7', 'epochs=4', 'trainer.progress_bar=false']",
     "3 runs (its command, below, makes 3, 2 never started: no record; 2 of the folder's runs are of other commands)."),
    ("['lr=0.3,0.5', 'epochs=4', 'trainer.progress_bar=false', 'resume=auto']",
     "3 runs (its command, below, makes 2, 1 never started: no record; 2 of the folder's runs are of other commands)."),
    ("['lr=-1,0.1,0.3', 'epochs=2,4', 'trainer.progress_bar=False']", "3 runs of its command's 6 jobs (3 never "
     "started: no record)."),
    ("['lr=-1,0.1,0.3', 'epochs=2,4']", "3 runs (its command, below, makes 6, 6 never started: no record; 3 of the "
     "folder's runs are of other commands)."),
    # a resumed sweep may change what a resume may (a review: its own runs were counted as another command's)
    ("['lr=-1,0.1,0.3', 'epochs=8', 'trainer.progress_bar=true', 'resume=auto']", "3 runs. Regimes"),
    ("['lr=-1,0.1,0.3,0.3', 'epochs=8', 'resume=auto']", "3 runs of its command's 4 jobs (1 never started: no record)."),
])
def test_report_md_tells_the_runs_of_its_command_from_other_commands_runs(tmp_path: Path, command: str,
                                                                           head: str) -> None:
    """A run is its command's when Hydra's record of its job holds one of the command's jobs (a probe: an
    earlier command's two runs in the folder hid two jobs of the last one that never started)."""
    for name, lr, epochs in (("0_a", -1, 2), ("1_b", 0.1, 2), ("0_c", 0.3, 4)):
        fake_run(tmp_path, name, "SGD", lr, 8, 0, 0.9)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(
            f"- lr={lr}\n- epochs={epochs}\n- trainer.progress_bar=False\n")
    (tmp_path / "multirun.yaml").write_text("hydra:\n  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper."
                                            f"BasicSweeper\n    params: null\n  overrides:\n    hydra: []\n    task: {command}\n")
    report(tmp_path)
    assert (tmp_path / "report.md").read_text().splitlines()[2].startswith(head)


def test_a_map_cell_shows_the_label_most_runs_got_and_marks_disagreement(tmp_path: Path) -> None:
    row = {"setting": "sgd", "widths": "8", "lr": 0.1}
    rows = [{**row, "regime": "healthy", "final_test_acc": 0.9}, {**row, "regime": "oscillating", "final_test_acc": 0.8},
            {**row, "regime": "healthy", "final_test_acc": 0.94},
            {**row, "lr": 1.0, "regime": "diverging", "final_test_acc": 0.1},
            {**row, "lr": 1.0, "regime": "diverging", "final_test_acc": 0.3},
            {**row, "lr": 3.0, "regime": "slow", "final_test_acc": None},  # a tie: the first label in LABELS' order
            {**row, "lr": 3.0, "regime": "underfit", "final_test_acc": None},
            {**row, "lr": 4.0, "regime": "crashed"}, {**row, "lr": 4.0, "regime": None},
            {**row, "lr": 5.0, "regime": "interrupted"}, {**row, "lr": 5.0, "regime": "interrupted"},
            {**row, "lr": 6.0, "regime": "unfinished"}]
    cells = map_cells(rows)
    assert cells[("sgd", "8", 0.1)] == MapCell("healthy", False, {"healthy": 2, "oscillating": 1}, 0.88)
    assert cells[("sgd", "8", 1.0)] == MapCell("diverging", True, {"diverging": 2}, 0.2)
    assert cells[("sgd", "8", 3.0)] == MapCell("slow", False, {"slow": 1, "underfit": 1}, None)
    assert cells[("sgd", "8", 4.0)] == MapCell("crashed", True, {"crashed": 2}, None)  # no label: crashed
    assert cells[("sgd", "8", 5.0)] == MapCell("interrupted", True, {"interrupted": 2}, None)
    assert cells[("sgd", "8", 6.0)] == MapCell("unfinished", True, {"unfinished": 1}, None)


def test_report_md_lists_the_map_cells_whose_seeds_disagree(tmp_path: Path) -> None:
    n = 0
    for lr in (0.01, 1.0):
        for width in (4, 64):
            for seed in (0, 1, 2):
                regime = "diverging" if lr == 1.0 and (width == 4 or seed == 0) else "healthy"
                fake_run(tmp_path, f"{n}_job", "SGD", lr, width, seed, 0.9, regime)
                n += 1
    report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "4 cells of several runs; in 1 of them the runs (seeds) disagree" in md
    assert "| sgd | 64 | 1 | healthy | diverging 1, healthy 2 |" in md


def test_runs_that_differ_in_more_than_lr_width_and_seed_are_not_one_cell(tmp_path: Path) -> None:
    """A swept weight decay (one seed): its two values are two settings of sgd, each its own cells,
    panel, stability column and seed-table rows, not two seeds of one cell."""
    n = 0
    for decay, regime in ((0.0, "slow"), (3.0, "diverging")):
        for lr in (0.1, 1.0):
            for width in (4, 8):
                fake_run(tmp_path, f"{n}_job", "SGD", lr, width, 0, 0.9, regime, decay=decay)
                n += 1
    report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "cells of several runs" not in md  # every cell holds one run
    assert ("**slow** in sgd (optimizer.weight_decay=0) 4 at lr 0.1 to 1; sgd (optimizer.weight_decay=0) 8 at "
            "lr 0.1 to 1. **diverging** in sgd (optimizer.weight_decay=3) 4 at lr 0.1 to 1") in md
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert {r["setting"] for r in rows} == {"sgd (optimizer.weight_decay=0)", "sgd (optimizer.weight_decay=3)"}
    assert (tmp_path / "regime_map.png").is_file()


def test_a_run_recorded_without_newer_keys_or_under_another_name_is_the_same_setting(tmp_path: Path) -> None:
    """One run's config lacks a key newer versions record (a sweep continued after an upgrade) and
    carries another name (an experiment differing in lr only): still one setting, sgd."""
    for n, lr in enumerate((0.1, 1.0)):
        for width in (4, 8):
            fake_run(tmp_path, f"{n}{width}_job", "SGD", lr, width, 0, 0.9)
    old = tmp_path / "04_job" / "summary.json"
    saved = json.loads(old.read_text())
    del saved["config"]["optimizer"]["weight_decay"]
    saved["config"]["name"] = "baseline"
    old.write_text(json.dumps(saved))
    report(tmp_path)
    assert {r["setting"] for r in csv.DictReader((tmp_path / "report.csv").open())} == {"sgd"}


def test_a_group_chosen_by_some_runs_only_is_a_setting(tmp_path: Path) -> None:
    """A probe's sweep of scheduler=none,cosine (and callbacks=default,early_stopping): the keys under the
    chosen group are only some runs', which the report had taken for keys an older version did not record,
    so both runs of a cell passed for seeds of one setting. A key that varies as another does is named once."""
    for n, lr in enumerate((0.1, 1.0)):
        for chosen in (False, True):
            name = f"{n}{int(chosen)}_job"
            fake_run(tmp_path, name, "SGD", lr, 8, 0, 0.9)
            path = tmp_path / name / "summary.json"
            saved = json.loads(path.read_text())
            saved["config"].update(
                scheduler={"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 3} if chosen else None,
                callbacks={"model_checkpoint": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint"}}
                | ({"early_stopping": {"_target_": "lightning.pytorch.callbacks.EarlyStopping", "patience": 3}}
                   if chosen else {}),
                batch_size=32 if chosen else 64, data={"batch_size": 32 if chosen else 64},
                # what a run logs and shows is no setting (a review: csv and tensorboard runs were two)
                logger={"csv": {"_target_": "CSVLogger"}} if lr == 0.1 else {"tensorboard": {"_target_": "TB"}})
            if lr == 0.1:
                saved["config"]["callbacks"]["lr_monitor"] = {"_target_": "LearningRateMonitor"}
            elif not chosen:  # as a run of scheduler=none records it (a probe: named "scheduler=-")
                saved["config"]["scheduler"] = {}
            path.write_text(json.dumps(saved))
    report(tmp_path)
    assert {r["setting"] for r in csv.DictReader((tmp_path / "report.csv").open())} == {
        "sgd (batch_size=64, callbacks=model_checkpoint, scheduler=none)",
        "sgd (batch_size=32, callbacks=early_stopping+model_checkpoint, scheduler=CosineAnnealingLR)"}


def test_a_job_without_a_readable_summary_is_placed_by_its_hydra_record(tmp_path: Path) -> None:
    """A job killed before its first summary, or whose summary is unreadable, is still placed in its sweep by
    Hydra's record of its job (a probe: its row had no lr, width or seed, so no map cell showed it)."""
    for lr in (0.01, 0.1):
        for seed in (0, 1):
            fake_run(tmp_path, f"{lr}_{seed}", "SGD", lr, 8, seed, 0.9)
    for name, summary in (("1.0_0", None), ("1.0_1", "{\"status\": \"comp")):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text(
            f"name: map\nlr: 1.0\nseed: {name[-1]}\nmodel: {{_target_: optimlab.models.MLP, hidden: [8]}}\n"
            "optimizer:\n  _target_: optimlab.optim.SGD\n  impl: custom\n  lr: ${lr}\n  weight_decay: 0.0\n")
        if summary:
            (tmp_path / name / "summary.json").write_text(summary)
    (tmp_path / "lost" / ".hydra").mkdir(parents=True)  # no record at all: listed, not placed
    report(tmp_path)
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    # an unreadable summary is not counted as a crash: how that run ended is unknown (a probe)
    for name, label, error in (("1.0_0", "crashed", "no summary.json (the job ended before writing one)"),
                               ("1.0_1", "unreadable", "summary.json unreadable")):
        assert {k: rows[name][k] for k in ("optimizer", "lr", "widths", "seed", "regime", "error", "setting")} == {
            "optimizer": "sgd", "lr": "1", "widths": "8", "seed": name[-1], "regime": label, "error": error,
            "setting": "sgd"}
    assert rows["lost"]["lr"] == "" and rows["lost"]["regime"] == "crashed"
    text = (tmp_path / "report.md").read_text()
    assert "**crashed** in sgd 8 at lr 1. **unreadable** in sgd 8 at lr 1." in text
    assert "7 runs. Regimes: healthy 4, crashed 2, unreadable 1" in text


def test_a_refused_job_with_a_negative_lr_is_listed_but_not_placed_on_the_lr_axis(tmp_path: Path) -> None:
    """A tracked map beside a job refused for lr=-1 (a crashed summary): the report lists it and still
    writes the map and stability.csv (a log lr axis has no place for -1: it raised a math domain error)."""
    for lr in (0.01, 0.1):
        for width in (4, 8):
            name = f"{width}_{lr}"
            fake_run(tmp_path, name, "SGD", lr, width, 0, 0.9)
            path = tmp_path / name / "summary.json"
            summary = json.loads(path.read_text())
            summary["curvature"] = {"measurements": 3, "initial_step": 0, "initial_sharpness": 5.0,
                                    "initial_threshold": 2 / lr, "first_crossing_step": None}
            path.write_text(json.dumps(summary))
    fake_run(tmp_path, "refused", "SGD", -1.0, 8, 0, 0.9)
    path = tmp_path / "refused" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "crashed", "epochs": [], "test_acc": None,
                                "error": "ConfigError: lr: -1.0 is not allowed; expected a positive number"}))
    # and one refused for lr=abc beside it (the findings took min() over -1.0 and 'abc': a TypeError; a probe)
    shutil.copytree(tmp_path / "refused", tmp_path / "refused_text")
    path_text = tmp_path / "refused_text" / "summary.json"
    summary = json.loads(path_text.read_text())
    summary["config"]["optimizer"]["lr"] = "abc"
    path_text.write_text(json.dumps(summary))
    written = report(tmp_path)
    assert {tmp_path / "stability.csv", tmp_path / "regime_map.png", tmp_path / "report.md"} <= set(written)
    assert "6 runs" in (tmp_path / "report.md").read_text()
    assert "**crashed** in sgd 8 at lr -1, abc." in (tmp_path / "report.md").read_text()
    assert "Not on the figures' lr axis (an lr that is not a positive number), only in the tables: 2 runs (refused, " \
           "refused_text)." in (tmp_path / "report.md").read_text()  # not left out of the map without a word
    why = {r["run"]: r["error"] for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert why["refused"] == "ConfigError: lr: -1.0 is not allowed; expected a positive number"
    path.write_text(json.dumps({**json.loads(path.read_text()), "error": "ValueError: a | b"}))
    report(tmp_path)
    row = next(line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| refused |"))
    assert row.endswith("| ValueError: a \\| b |")  # a | in a cell would split the markdown table
    (tmp_path / "4_0.1" / "summary.json").write_text("{not json")
    report(tmp_path)
    assert {r["run"]: r["error"] for r in csv.DictReader((tmp_path / "report.csv").open())}["4_0.1"] == \
        "summary.json unreadable"
    assert [t["width"] for t in csv.DictReader((tmp_path / "stability.csv").open())] == ["4", "8"]


def test_data_passes_counts_how_often_the_training_images_were_seen() -> None:
    fine_map = {"data": {"batch_size": 32}, "trainer": {"limit_train_batches": 0.1}}
    # The fine map: 10 epochs of 184 batches of 32 over 59,000 images: one pass, just under.
    assert data_passes(fine_map, 10, 59_000) == pytest.approx(10 * 184 * 32 / 59_000)
    assert data_passes(fine_map, 9, 59_000) == pytest.approx(9 * 184 * 32 / 59_000)  # killed in epoch 10
    # Whole epochs, the last batch partial (430 x 128 > 55,000): one pass each.
    assert data_passes({"data": {"batch_size": 128}, "trainer": {"limit_train_batches": None}}, 10, 55_000) == 10.0
    assert data_passes({"data": {"batch_size": 128}, "trainer": {"limit_train_batches": 20}}, 3, 55_000) == (
        pytest.approx(3 * 20 * 128 / 55_000))
    for epochs, size, cfg in ((0, 100, fine_map), (1, None, fine_map), (1, 100, {}),
                              (1, 100, {"data": {"batch_size": 32}, "trainer": {"limit_train_batches": 0.001}}),
                              (1, 100, {"data": {"batch_size": True}})):  # a hand-edited record
        assert data_passes(cfg, epochs, size) is None


def test_validation_size_is_read_only_where_it_is_a_count() -> None:
    assert validation_size({"data": {"val_size": 5000}}) == 5000
    for edited in ({}, {"data": {"val_size": -5}}, {"data": {"val_size": 0}}, {"data": {"val_size": True}},
                   {"data": {"val_size": 5000.0}}):
        assert validation_size(edited) is None


def test_panel_titles_tell_runs_apart_only_where_they_would_look_alike() -> None:
    from optimlab.report.figures import _run_titles

    base = {"name": "default", "optimizer": "sgd", "setting": "sgd", "lr": 0.1, "regime": "slow", "run": "x"}
    runs = [{**base, "widths": "8", "seed": 0}, {**base, "widths": "8x8", "seed": 1}, {**base, "lr": 1.0, "widths": "8", "seed": 0}]
    assert _run_titles(runs) == ["default: sgd lr 0.1\n8, seed 0: slow", "default: sgd lr 0.1\n8x8, seed 1: slow",
                                 "default: sgd lr 1\nslow"]
    runs = [{**base, "widths": "8", "seed": 0, "data_seed": k} for k in (0, 1)]  # a sweep of data.seed alone
    assert _run_titles(runs) == ["default: sgd lr 0.1\n8, seed 0: slow", "default: sgd lr 0.1\n8, seed 0, data seed 1: slow"]


def lr_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lrs: tuple[float, ...]):
    """The first panel of lr_sensitivity.png drawn for one SGD run per lr in ``lrs`` (the last diverging),
    with any warning an error."""
    from matplotlib.figure import Figure

    for n, lr in enumerate(lrs):
        fake_run(tmp_path, f"{n}_lr={lr}", "SGD", lr, 8, 0, 0.9 - 0.1 * n, regime="diverging" if n == len(lrs) - 1 else "healthy")
    drawn: dict[str, Figure] = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.setdefault(Path(path).name, fig))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report(tmp_path)
    figure = drawn["lr_sensitivity.png"]
    figure.canvas.draw()
    return figure.axes[0]


def test_the_maps_lr_ticks_keep_three_significant_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    for lr in (3.16e-4, 1e-3, 3.16e-3, 0.0316, 3.16):
        for width in (4, 8):
            fake_run(tmp_path, f"{width}_{lr}", "SGD", lr, width, 0, 0.9)
    drawn: dict[str, Figure] = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.setdefault(Path(path).name, fig))
    report(tmp_path)
    labels = [label.get_text() for label in drawn["regime_map.png"].axes[0].get_xticklabels()]
    assert labels == ["0.000316", "0.001", "0.00316", "0.0316", "3.16"]  # 0.00316 had read 0.0032 (a probe)


def test_runs_without_a_test_accuracy_are_not_drawn_at_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed job (a config error) has no accuracy: lr_sensitivity.png leaves it out, not at 0%."""
    from matplotlib.figure import Figure

    for n, lr in enumerate((0.01, 0.1, 1.0)):
        fake_run(tmp_path, f"{n}", "SGD", lr, 8, 0, 0.9)
    path = tmp_path / "2" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "crashed", "epochs": [], "test_acc": None,
                                "regime": None, "error": "ConfigError: curvature.iters: 1 is not allowed"}))
    drawn: dict[str, Figure] = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.setdefault(Path(path).name, fig))
    report(tmp_path)
    points = [tuple(xy) for c in drawn["lr_sensitivity.png"].axes[0].collections for xy in c.get_offsets()]
    assert sorted(points) == [(-2.0, 0.9), (-1.0, 0.9)]
    path = tmp_path / "1" / "summary.json"  # one lr left with a test accuracy: no lr axis to draw
    path.write_text(json.dumps({**json.loads(path.read_text()), "status": "interrupted", "test_acc": None}))
    assert tmp_path / "lr_sensitivity.png" not in report(tmp_path)


def test_the_lr_axis_places_lrs_up_to_the_largest_floats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep of lr 0.1 and 1e307 (a float64 run driven to overflow): both points lie on the lr axis, and
    drawing it warns of nothing (matplotlib's log axis overflowed there and showed lr 1 to 10, no point on it)."""
    ax = lr_axis(tmp_path, monkeypatch, (0.1, 1e307))
    low, high = ax.get_xlim()
    placed = [x for line in ax.lines for x in line.get_xdata()]  # at log10(lr)
    assert sorted(placed) == pytest.approx([-1, 307]) and low < -1 and high > 307
    assert "$10^{0}$" in [label.get_text() for label in ax.get_xticklabels()]


@pytest.mark.parametrize("lrs", [(0.05, 0.1), (3.16e-4, 5e-4)])
def test_the_lr_axis_is_labelled_in_powers_of_ten_however_narrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 lrs: tuple[float, ...]) -> None:
    """Within one decade the ticks are still whole powers of ten, never 10^-1.28."""
    ax = lr_axis(tmp_path, monkeypatch, lrs)
    labels = [label.get_text() for label in ax.get_xticklabels()]
    assert labels and all(re.fullmatch(r"\$10\^\{-?\d+\}\$", label) for label in labels), labels


def test_the_maps_width_axis_names_what_the_model_varies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CNN's map varies its conv channels, an MLP's its hidden widths: the y axis says which."""
    from matplotlib.figure import Figure

    for model in ("mlp", "cnn"):
        for lr in (0.01, 0.1):
            for width in (4, 8):
                fake_run(tmp_path / model, f"{width}_{lr}", "SGD", lr, width, 0, 0.9)
                if model == "cnn":
                    path = tmp_path / model / f"{width}_{lr}" / "summary.json"
                    summary = json.loads(path.read_text())
                    summary["config"]["model"] = {"_target_": "optimlab.models.CNN", "channels": [width, 16]}
                    path.write_text(json.dumps(summary))
        drawn: dict[str, Figure] = {}
        monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.setdefault(Path(path).name, fig))
        report(tmp_path / model)
        assert drawn["regime_map.png"].axes[0].get_ylabel() == {"mlp": "hidden widths", "cnn": "conv channels"}[model]


def test_a_number_written_as_int_or_float_is_one_setting(tmp_path: Path) -> None:
    """weight_decay 0 (from the command line) and 0.0 (from a yaml) are one setting and seeds of one experiment."""
    for seed, decay in enumerate((0, 0.0)):
        fake_run(tmp_path, f"{seed}", "SGD", 0.1, 8, seed, 0.9, decay=decay)
    report(tmp_path)
    with (tmp_path / "report.csv").open(newline="") as table:
        assert {row["setting"] for row in csv.DictReader(table)} == {"sgd"}
    assert "| map | mlp | sgd | 0.1 | 8 | 2 |" in (tmp_path / "report.md").read_text()
    # but not where Lightning tells them apart: 1.0 is all batches, 1 is one batch (a review)
    assert plain_numbers({"trainer": {"limit_train_batches": 1.0, "max_epochs": 2.0}}) == {
        "trainer": {"limit_train_batches": 1.0, "max_epochs": 2}}


def test_every_label_has_a_colour_of_its_own_apart_from_the_stability_bar() -> None:
    """The map draws the predicted largest stable lr as a black bar (unreadable was black too: a review)."""
    from matplotlib.colors import to_hex

    from optimlab.report.aggregate import PLOT_LABELS
    from optimlab.report.figures import REGIME_COLORS

    colours = [to_hex(REGIME_COLORS[label]) for label in PLOT_LABELS]
    assert len(set(colours)) == len(colours) and to_hex("black") not in colours


def test_an_interrupted_run_is_drawn_as_interrupted_not_crashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped with Ctrl-C is interrupted; one whose summary still says running (killed, or still running) is
    unfinished: its map cell and its table rows say so alike, each in its own colour (it had been drawn as crashed,
    then as interrupted while the tables said running: a probe)."""
    from matplotlib.figure import Figure

    for lr in (0.01, 0.1, 1.0):
        for width in (4, 8):
            fake_run(tmp_path, f"{width}_{lr}", "SGD", lr, width, 0, 0.9)
    for name, status in (("8_0.1", "interrupted"), ("4_0.1", "running")):
        path = tmp_path / name / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "status": status, "test_acc": None, "regime": None}))
    drawn: dict[str, Figure] = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.setdefault(Path(path).name, fig))
    report(tmp_path)
    from optimlab.report.rows import find_runs, name_settings, row_for
    rows = [row_for(d, tmp_path) for d in find_runs(tmp_path)]
    name_settings(rows)
    assert {key[1:]: cell.regime for key, cell in map_cells(rows).items()} == {
        ("4", 0.01): "healthy", ("8", 0.01): "healthy", ("4", 0.1): "unfinished", ("8", 0.1): "interrupted",
        ("4", 1.0): "healthy", ("8", 1.0): "healthy"}
    legend = [text.get_text() for text in drawn["regime_map.png"].legends[0].get_texts()]
    assert {"interrupted", "unfinished", "crashed"} <= set(legend)
    text = (tmp_path / "report.md").read_text()
    assert "6 runs. Regimes: healthy 4, unfinished 1, interrupted 1" in text
    assert "| unfinished | False | running |" in text  # the label, and the status its record holds
    assert "**unfinished** in sgd 4 at lr 0.1" in text
    drawn_labels = [text.get_text() for text in drawn["lr_sensitivity.png"].legends[0].get_texts()]
    assert "healthy" in drawn_labels and not {"interrupted", "crashed"} & set(drawn_labels)  # what it cannot draw


def test_table_cells_keep_lrs_apart() -> None:
    """Four significant digits below 0.1 (a probe: lr 0.00316 was printed 0.0032, as 0.0032 is)."""
    from optimlab.report.tables import fmt

    assert [fmt(v) for v in (0.00316, 0.0032, 0.0026994, 0.0005835, 0.0316228, 0.973, 1.0, 12345.6, None, "sgd")] == \
        ["0.00316", "0.0032", "0.002699", "0.0005835", "0.03162", "0.973", "1", "1.235e+04", "", "sgd"]
