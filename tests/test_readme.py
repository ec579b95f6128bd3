"""Every `python train.py` and `optimlab-report` command in the README's code blocks, word for word,
run at a tiny budget (appended overrides shrink the data and the epochs; sweeps of the big grids
are planned with the population launcher's dry run instead of trained)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TINY = ["data.subset=256", "data.val_size=256", "epochs=1", "trainer.progress_bar=false"]
BIG_GRIDS = ("sweep=regime_map", "sweep=regimes")  # hundreds of jobs: checked by planning them


def readme_commands() -> list[str]:
    """The README's commands: code-block lines and inline code without placeholders (``<run dir>``)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    lines += [span for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
              if "<" not in span]
    return list(dict.fromkeys(line for line in lines if line.startswith(("python train.py", "optimlab-report"))))


def test_the_readme_shows_the_commands_a_newcomer_needs() -> None:
    commands = readme_commands()
    assert "python train.py" in commands and any(c.startswith("optimlab-report") for c in commands)
    assert any("hparams_search=optuna" in c for c in commands) and any(" -m " in c for c in commands)


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("python train.py")])
def test_readme_command_runs(tmp_path: Path, command: str) -> None:
    args = shlex.split(command)[2:]
    multirun = "-m" in args or "hparams_search=optuna" in args
    extra = [*TINY, f"hydra.{'sweep' if multirun else 'run'}.dir={tmp_path / 'out'}"]
    if "hparams_search=optuna" in args:
        extra.append("hydra.sweeper.n_trials=2")
    if any(grid in args for grid in BIG_GRIDS):
        extra = ["hydra.launcher.dry_run=true"] + ([] if "hydra/launcher=population" in args
                                                   else ["hydra/launcher=population"])
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args, *extra], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if extra[0] != "hydra.launcher.dry_run=true":
        assert list((tmp_path / "out").rglob("summary.json"))
    else:
        assert not list(tmp_path.rglob("summary.json")) and "population" in result.stdout


@pytest.mark.slow
def test_readme_report_command_runs_on_a_readme_sweep(tmp_path: Path) -> None:
    sweep = next(c for c in readme_commands() if c.startswith("python train.py -m lr="))
    subprocess.run([sys.executable, str(REPO / "train.py"), *shlex.split(sweep)[2:], *TINY,
                    f"hydra.sweep.dir={tmp_path}"], check=True, capture_output=True, timeout=600)
    report = next(c for c in readme_commands() if c.startswith("optimlab-report outputs/multirun/<date_time>"))
    args = [str(tmp_path) if a == "outputs/multirun/<date_time>" else a for a in shlex.split(report)[1:]]
    result = subprocess.run([sys.executable, "-m", "optimlab.report", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "curves.png").is_file()
