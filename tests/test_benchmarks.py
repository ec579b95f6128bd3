"""The benchmark scripts still run and print their tables (tiny settings; no timing is asserted:
speed is measured by running the scripts by hand, see benchmarks/README.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


def bench(script: str, *args: str) -> str:
    """The output of ``python benchmarks/<script> <args>``, or a failure showing it if the script did not exit 0."""
    result = run_script(ROOT / "benchmarks" / script, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_optimizer_step_prints_a_row_per_optimizer_and_model() -> None:
    out = bench("optimizer_step.py", "--repeats", "1", "--steps", "1", "--warmup", "1", "--device", "cpu",
                "--optimizers", "SGD,Adam", "--models", "mlp,cnn")
    rows = [line.split() for line in out.splitlines() if line.startswith("cpu ")]
    assert sorted((r[1], r[2]) for r in rows) == [("cnn", "Adam"), ("cnn", "SGD"), ("mlp", "Adam"), ("mlp", "SGD")]
    assert all(r[-1] in ("PASS", "FAIL") and float(r[-2]) > 0 for r in rows)


@pytest.mark.slow
def test_train_loop_prints_the_overhead_and_the_epoch_time() -> None:
    out = bench("train_loop.py", "--batches", "3", "--repeats", "1", "--warmup", "2", "--device", "cpu", "--floor")
    row = next(line.split() for line in out.splitlines() if line.startswith("cpu "))
    assert row[1] == "mlp" and float(row[2]) > 0 and float(row[3]) > 0 and float(row[4]) > 0
    assert "s per 430-batch epoch" in out
    floor = next(line.split() for line in out.splitlines() if line.startswith("  cpu: ") and "steps/s," in line)
    assert float(floor[1]) > 0 and float(floor[3]) > 0  # bare Lightning's steps/s and plain / bare


@pytest.mark.parametrize("script, args, line", [
    ("train_loop.py", ["--warmup", "0"], "argument --warmup: 0 is not allowed; expected an integer >= 1"),
    ("train_loop.py", ["--batches", "1"], "--batches and --warmup must be in 2..430"),  # no steps/s from one step
    ("optimizer_step.py", ["--repeats", "0"], "argument --repeats: 0 is not allowed"),  # a median of nothing
    ("curvature.py", ["--variants", "64@0"], "argument --variants: '64@0' is not PROBE@EVERY of two integers >= 1"),
    ("curvature.py", ["--steps", "20", "--repeats", "1"], "--variants 1024@100,1024@200: never measured"),
    ("population_curvature.py", ["--widths", "8,,16"], "argument --widths: '' is not an integer"),
])
def test_a_bad_benchmark_argument_is_a_usage_line(script: str, args: list[str], line: str) -> None:
    """Before any work, in one line (a probe: tracebacks mid-run, or a run that never measured)."""
    result = run_script(ROOT / "benchmarks" / script, *args)
    assert result.returncode == 2 and line in result.stderr.strip().splitlines()[-1], result.stderr[-1000:]


@pytest.mark.slow
def test_denormals_compares_flushing_on_and_off() -> None:
    out = bench("denormals.py", "--warm-steps", "5", "--steps", "2", "--repeats", "1")
    assert "slowdown without flushing" in out


@pytest.mark.slow
def test_suite_runs_the_experiments_and_keeps_their_summaries(tmp_path: Path) -> None:
    out_dir = tmp_path / "suite"
    out = bench("suite.py", "--experiments", "baseline,diverging", "--extra", "epochs=1 data.subset=512", "--quiet",
                "--out", str(out_dir))
    summaries = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*/summary.json"))]
    assert [s["description"]["name"] for s in summaries] == ["baseline", "diverging"]
    assert all(s["epochs_completed"] == 1 and s["regime"] for s in summaries)
    assert "2/2 summaries" in out and (out_dir / "suite.log").is_file()


@pytest.mark.slow
def test_population_curvature_compares_batched_and_one_by_one() -> None:
    out = bench("population_curvature.py", "--widths", "8", "--members", "2", "--probe", "16", "--repeats", "1",
                "--device", "cpu")
    row = next(line.split() for line in out.splitlines() if line.startswith("cpu "))
    assert row[1:5] == ["8", "2", "16", "5"] and float(row[5]) > 0 and float(row[6]) > 0
    assert float(row[-1]) < 1e-4  # the same start vectors, the same products: the same values


@pytest.mark.slow
def test_curvature_times_tracking_and_the_least_a_measurement_costs() -> None:
    out = bench("curvature.py", "--variants", "16@2", "--steps", "4", "--repeats", "1", "--reference", "32",
                "--iters", "2", "--threads", "1")
    row = next(line for line in out.splitlines() if line.startswith("probe 16 every 2 "))
    cells = row.split()
    assert cells[10] == "2"  # HVPs per measurement: --iters caps them
    least_steps, least_overhead = float(cells[-2]), float(cells[-1])
    assert least_steps > 0 and least_overhead == pytest.approx(1 + least_steps / 2, abs=2e-3)
    assert "SharpnessTracker iters 2, tol 0.02" in out
