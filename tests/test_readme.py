"""Every `python train.py` and `optimlab-report` command of the README, word for word, at a tiny
budget (appended overrides shrink the data and the epochs). Plain runs and the jobs of plain sweeps
run in-process (a new process per command would cost seconds of imports each); the commands that
need Hydra's plugins (joblib, Optuna) run whole through train.py's command line (in this process:
joblib's workers are processes of their own); the big named grids have every job composed and
validated by test_configs.py, and their first job here."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import REPO, compose_config, run_script
from optimlab.report import main as report_main
from optimlab.train import run
from optimlab.validate import validate_config
from test_configs import sweep_jobs

TINY = ["data.subset=256", "data.val_size=256", "epochs=1", "trainer.limit_train_batches=null",  # the maps' 0.1: no batch
        "trainer.progress_bar=false", "data.test_every_epoch=false",  # the test set once, at the end
        "curvature.probe_size=64"]  # where a command tracks sharpness (experiment=overfit: 5M weights)
PLUGINS = ("hydra/launcher=joblib", "hparams_search=optuna")  # run whole, through the command line


def readme_commands() -> list[str]:
    """The README's commands: code-block lines and inline code without placeholders (``<run dir>``)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    lines += [span for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
              if "<" not in span]
    return list(dict.fromkeys(line for line in lines if line.startswith(("python train.py", "optimlab-report"))))


def jobs_of(args: list[str]) -> list[list[str]]:
    """The override lists of the jobs a command runs: one for a single run; for ``-m``, the product
    of its comma lists, or a named sweep's first job."""
    args = [a for a in args if a != "-m"]
    named = [a for a in args if a.startswith("sweep=")]
    if named:
        return [[*sweep_jobs(named[0].split("=", 1)[1])[0], *(a for a in args if a not in named)]]
    parsed = OverridesParser.create().parse_overrides(args)
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


TRAIN = [c for c in readme_commands() if c.startswith("python train.py")]


def test_the_readme_shows_the_commands_a_newcomer_needs() -> None:
    assert "python train.py" in TRAIN and any(c.startswith("optimlab-report") for c in readme_commands())
    assert any("hparams_search=optuna" in c for c in TRAIN) and any(" -m " in c for c in TRAIN)


@pytest.mark.parametrize("command", [c for c in TRAIN if not any(p in c for p in PLUGINS)])
def test_readme_command_runs(tmp_path: Path, command: str) -> None:
    jobs = jobs_of(shlex.split(command)[2:])
    for job in jobs:  # every job composes and validates
        validate_config(compose_config(*job))
    job = [o for o in jobs[0] if not o.startswith("hydra/")] + TINY
    summary = run(compose_config(*job), tmp_path, job)
    assert summary.status in ("complete", "diverged") and (tmp_path / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in TRAIN if any(p in c for p in PLUGINS)])
def test_readme_plugin_command_runs(tmp_path: Path, command: str, capfd: pytest.CaptureFixture[str]) -> None:
    extra = [*TINY, f"hydra.sweep.dir={tmp_path / 'out'}"]
    if "hparams_search=optuna" in command:
        extra.append("hydra.sweeper.n_trials=2")
    result = run_script(REPO / "train.py", *shlex.split(command)[2:], *extra, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    workers = capfd.readouterr().err  # joblib's worker processes write to the real stderr
    assert "Traceback" not in workers, workers[-3000:]
    assert len(list((tmp_path / "out").glob("*/summary.json"))) == 2


def test_readme_report_command_runs_on_a_readme_sweep(tmp_path: Path) -> None:
    sweep = next(c for c in TRAIN if c.startswith("python train.py -m lr="))
    for number, job in enumerate(jobs_of(shlex.split(sweep)[2:])[:2]):
        run(compose_config(*job, *TINY), tmp_path / f"{number}_{','.join(job)}", [*job, *TINY])
    report = next(c for c in readme_commands() if c.startswith("optimlab-report outputs/multirun/<date_time>"))
    args = [str(tmp_path) if a == "outputs/multirun/<date_time>" else a for a in shlex.split(report)[1:]]
    assert report_main(args) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "curves.png").is_file()
