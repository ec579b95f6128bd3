"""End to end: `python train.py` as a user runs it, and `run()` in-process for finer checks."""

from __future__ import annotations

import csv
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, compose_config, run_script
from optimlab.mnist_files import DataError
from optimlab.command_line import command_line_override
from optimlab.hydra_job import config_yaml, job_dirname, write_job_record
from optimlab.record import STEP_SCALARS, result_line
from optimlab.summary import RunSummary
from optimlab.train import run
from optimlab.validate import ConfigError

FAST = ["data.subset=512", "data.val_size=500", "epochs=2", "trainer.progress_bar=false",
        "data.test_every_epoch=false"]  # the test set once, at the end (10,000 images through the default MLP)
EPOCH_KEYS = {"train_loss", "train_acc", "val_loss", "val_acc"}
# Refused on a CPU-only machine, valid where a GPU is.
NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="valid on this machine: it has a GPU")


def train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_script(REPO / "train.py", *args, cwd=cwd)


def check_run_dir(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete", summary.get("error")
    for key in ("config", "params", "epochs", "test_loss", "test_acc", "diverged", "diverged_at_step",
                "wall_time_s", "steps_per_s", "regime", "regime_evidence", "interrupted"):
        assert key in summary
    assert summary["epochs"] and all(EPOCH_KEYS <= set(row) for row in summary["epochs"])
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["params"] > 0 and summary["steps_per_s"] > 0
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # one event file per run
    assert b"_hparams_/experiment" in events[0].read_bytes() and b"train/loss" in events[0].read_bytes()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return summary


@pytest.mark.slow
def test_multirun_trains_every_optimizer(tmp_path: Path) -> None:
    result = train("-m", "optimizer=sgd,adagrad,adam,rmsprop", "lr=0.001", *FAST, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    # job number, then the overrides: readable, and unique within the sweep
    assert [p.name for p in runs] == [
        f"{i}_data.subset=512,data.test_every_epoch=False,data.val_size=500,epochs=2,lr=0.001,optimizer={o}"
        for i, o in enumerate(["sgd", "adagrad", "adam", "rmsprop"])]
    for run_dir, name in zip(runs, ["SGD", "Adagrad", "Adam", "RMSprop"]):
        summary = check_run_dir(run_dir)
        assert summary["config"]["optimizer"]["_target_"] == f"optimlab.optim.{name}"
        losses = [row["train_loss"] for row in summary["epochs"]]
        assert losses[1] < losses[0]  # learning
    # the report command over this sweep, plus a job that crashed before writing anything
    (tmp_path / "4_crashed" / ".hydra").mkdir(parents=True)
    report = subprocess.run([str(Path(sys.executable).with_name("optimlab-report")), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["optimizer"] for r in rows] == ["sgd", "adagrad", "adam", "rmsprop", ""]
    assert rows[-1]["status"] == "crashed"
    for name in ("report.md", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0


@pytest.mark.parametrize("folder", ["outputs/runs/2026-12-06_15-09-41-123_default", "/tmp/sweep/2_lr=0.2,model.hidden=[16]",
                                    "/tmp/a b/x", 'odd"quote=1', "it's,here", "123"])
def test_a_printed_resume_override_is_read_back_as_the_folder(folder: str) -> None:
    """The suggestion an interrupted run prints, pasted into a shell: Hydra gets the folder itself (a
    sweep job's folder name, with its = and ,, broke Hydra's grammar unquoted)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    [word] = shlex.split(command_line_override("resume", folder))
    override = OverridesParser.create().parse_override(word)
    assert (override.key_or_group, override.value()) == ("resume", folder)


def test_job_folder_names_fit_a_file_system() -> None:
    short = "lr=0.1,optimizer=adam"
    assert job_dirname(short) == short
    long_a, long_b = "x" * 300 + ",seed=0", "x" * 300 + ",seed=1"
    a, b = job_dirname(long_a), job_dirname(long_b)
    assert len(a.encode()) == len(b.encode()) == 200 and a != b and a == job_dirname(long_a)
    assert a.startswith("x" * 150) and a[-9] == "~"
    wide = job_dirname("model.name=" + "\u00e9" * 200)  # two bytes each: never cut inside a character
    assert len(wide.encode()) <= 200 and wide.startswith("model.name=\u00e9")
    # one folder, not a folder "...monitor=val" holding "acc,..." (a probe's sweep)
    assert job_dirname("callbacks.model_checkpoint.monitor=val/acc,lr=0.1") == \
        "callbacks.model_checkpoint.monitor=val%2Facc,lr=0.1"


# Strings a YAML writer must quote, escape, fold or keep (OmegaConf reads 1e5 as a float, YAML 1.1's
# "Off" as a bool), and interpolations, which a job's record keeps unresolved.
AWKWARD = ["1e5", "yes", "Off", "Y", "", " ", "null", "~", "${lr}", "1_000", "0x1F", ".inf", "nan", "-inf", "1.",
           " 1", "+1", "1:20", "2001-12-14", "0o17", "\u00fc\u2192\u00f1", "*star", "&anchor", "!tag", "- dash",
           "a: b", "# hash", "a #b", "\ttab", "it's", 'say "hi"', "word " * 30, "line1\nline2", "trail\n",
           "\n lead", "{a}", "[1]", "a\\b", "\x07bell", "\u2028", "\ufeffbom", "@at", "%pct", "`tick"]


def test_job_records_are_written_as_omegaconf_writes_them(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"lr": 0.1, "strings": AWKWARD, "nested": {"rows": [{"k": s} for s in AWKWARD],
                            "none": None, "big": 1e300, "flag": True, "lr": "${lr}", "mixed": [1, "1", 1.0, "1.0", [], {}]},
                            "empty": {}})
    for node, under in [(cfg, None), (cfg, "hydra"), (cfg.strings, None)]:
        assert config_yaml(node, under=under) == OmegaConf.to_yaml(OmegaConf.create({under: node}) if under else node)
    hydra = OmegaConf.create({"overrides": {"task": ["lr=0.1", "model.name='1e5'"]}, "job": {"name": "${lr}"}})
    write_job_record(tmp_path, cfg, hydra)
    assert OmegaConf.load(tmp_path / "config.yaml") == cfg
    assert OmegaConf.load(tmp_path / "hydra.yaml") == {"hydra": hydra}
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "overrides.yaml")) == ["lr=0.1", "model.name='1e5'"]


def test_the_tensorboard_loggers_hparams_yaml_is_the_one_lightning_writes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """hparams.yaml of plain values, written by the run's TensorBoard logger itself (Lightning's writer is
    not called), is the text Lightning's save_hparams_to_yaml writes for them; other values are left to Lightning."""
    import lightning.pytorch.loggers.tensorboard as lightning_tensorboard
    from lightning.pytorch.core.saving import save_hparams_to_yaml

    from optimlab.tensorboard_logger import TensorBoardRunLogger

    def only_nested(path, params, *args, **kwargs):
        assert "model" in params, "plain hyperparameters are written by the logger itself"
        return save_hparams_to_yaml(path, params, *args, **kwargs)

    monkeypatch.setattr(lightning_tensorboard, "save_hparams_to_yaml", only_nested)

    plain = {**{f"s{i}": text for i, text in enumerate(AWKWARD)}, "lr": 0.1, "tiny": 1e-300, "nan": math.nan,
             "inf": -math.inf, "seed": 3, "flag": False, "none": None}
    for name, params in [("plain", plain), ("nested", {"lr": 0.1, "model": {"hidden": [8, 8]}})]:
        logger = TensorBoardRunLogger(save_dir=str(tmp_path / name), name="", version="", default_hp_metric=False)
        logger.log_hyperparams(params)
        logger.log_metrics({"train/loss": 1.0}, step=0)
        logger.close("success")
        save_hparams_to_yaml(tmp_path / f"{name}.yaml", params)
        assert (tmp_path / name / "hparams.yaml").read_text() == (tmp_path / f"{name}.yaml").read_text(), name


def test_a_runs_hparams_yaml_replaces_lightnings_empty_one_but_not_another_runs(tmp_path: Path) -> None:
    """The ``{}`` Lightning saves at a fit's start gives way to the run's hyperparameters; a folder that runs
    share (``logger.tensorboard.save_dir``, name and version empty) keeps the first run's (a review)."""
    from optimlab.tensorboard_logger import TensorBoardRunLogger

    (tmp_path / "hparams.yaml").write_text("{}\n")
    for lr in (0.1, 0.2):
        logger = TensorBoardRunLogger(save_dir=str(tmp_path), name="", version="", default_hp_metric=False)
        logger.log_hyperparams({"lr": lr, "regime": "healthy"})
        logger.close("success")
    assert (tmp_path / "hparams.yaml").read_text() == "lr: 0.1\nregime: healthy\n"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "population"])
def test_a_sweep_with_many_overrides_gets_short_job_folders(tmp_path: Path, launcher: str) -> None:
    """The job folders' names (number and overrides) would exceed 255 bytes: cut, hashed, and trained."""
    many = ["optimizer=rmsprop", "optimizer.centered=true", "optimizer.momentum=0.5", "lr=0.001,0.002",
            "model.hidden=[16]", "batch_size=64", "data.test_every_epoch=false", "trainer.log_every_n_steps=5",
            "trainer.check_finite_every_n_steps=1", "optimizer.weight_decay=0.0001", "regimes.fit_acc=0.5"]
    result = train("-m", f"hydra/launcher={launcher}", *many, *FAST, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))  # .populations: their checkpoints
    assert len(runs) == 2 and all(len(p.name.encode()) <= 210 and "~" in p.name for p in runs)
    assert runs[0].name.startswith("0_batch_size=64,data.subset=512,data.test_every_epoch=False,")
    for run_dir in runs:  # (a population keeps one checkpoint for its members, in .populations/)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "complete" and len(summary["epochs"]) == 2
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_cnn_single_run(tmp_path: Path) -> None:
    result = train("model=cnn", "lr=0.06", *FAST, "data.test_every_epoch=false", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = check_run_dir(tmp_path)
    assert summary["config"]["model"]["_target_"] == "optimlab.models.CNN"
    assert "regime:" in result.stdout and "epoch   2/2" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert lines == [line.split(" - ", 1)[1] for line in (tmp_path / "train.log").read_text().splitlines()
                     if "][INFO] - epoch " in line]  # the console's epoch lines, timed, in train.log


@pytest.mark.slow
def test_testing_the_best_checkpoint_keeps_the_whole_record(tmp_path: Path) -> None:
    # Early stopping on val/acc at lr 1.0, where this run's epoch 2 falls (0.208 to 0.126): epoch 1 is the
    # best, patience 1 stops the run there; the test uses epoch 1's weights.
    # Tracked sharpness (every 2 steps after a log-spaced start, 4 steps an epoch): those after the best epoch stay.
    cfg = compose_config(*FAST, "data.test_every_epoch=true", "epochs=4", "lr=1.0", "callbacks=early_stopping",
                         "callbacks.model_checkpoint.monitor=val/acc", "callbacks.model_checkpoint.mode=max",
                         "callbacks.early_stopping.patience=1", "test_ckpt=best", "curvature.every_n_steps=2",
                         "curvature.probe_size=32")
    summary = run(cfg, tmp_path)
    assert summary.tested_checkpoint == "best"
    assert [row["epoch"] for row in summary.epochs] == [1, 2]  # not just the best epoch's record
    series = summary.curvature["series"]
    assert [row[0] for row in series] == [0, 1, 2, 4, 6, 8] and summary.curvature["measurements"] == 6
    assert summary.epochs[1]["sharpness_last"] == series[-1][1]
    assert summary.epochs[1]["val_acc"] < summary.epochs[0]["val_acc"]
    assert summary.test_loss == pytest.approx(summary.epochs[0]["test_loss"], rel=1e-5)  # epoch 1's weights
    assert summary.test_loss != pytest.approx(summary.epochs[1]["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_a_run_whose_best_checkpoint_was_never_written_tests_its_last_weights(tmp_path: Path) -> None:
    # lr 1e300 with weight decay (float64): an update overflows the weights in epoch 1, whose checkpoint (the
    # first best) is then not written; the run is tested with its last weights instead of failing to find it.
    cfg = compose_config(*FAST, "data.test_every_epoch=true", "epochs=2", "lr=1e300", "optimizer.weight_decay=0.1",
                         "trainer.precision=64-true", "test_ckpt=best")
    summary = run(cfg, tmp_path)
    assert (summary.status, summary.tested_checkpoint) == ("diverged", "last")
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()
    assert summary.test_acc == summary.epochs[-1]["test_acc"]


@pytest.mark.parametrize("args, error", [
    (["model=resnet"], "model: 'resnet' is not an option; expected one of cnn, mlp (conf/model/)"),
    (["-m", "optimizer=sgd,nope"], "optimizer: 'nope' is not an option; expected one of adagrad, adam, rmsprop, sgd"),
    (["+experiment=nope"], "experiment: 'nope' is not an option"),
    (["experiment=null"], "experiment: null is not an option; expected one of baseline, cnn, "),
    (["model=null"], "model: null is not an option; expected one of cnn, mlp (conf/model/), or leave model out for its "
                     "default"),
    # Hydra launched no job and exited 0, leaving the sweep folder's multirun.yaml (a probe)
    (["-m", "lr=range(0,0)"], "lr: range(0,0) sweeps no value; a sweep needs at least one"),
    (["-m", "seed=0,1", "+x=shuffle(range(3,1))", "--config-dir", "."], "x: shuffle(range(3,1)) sweeps no value"),
    # what Hydra cannot compose: its error was several lines and the pointer (a key without +, in a sweep mid-way)
    (["foo=1"], "foo: unknown config key (nothing reads it); check the spelling, or see conf/"),
    (["-m", "model=mlp,cnn", "model.hidden=[8]"], "model.hidden: unknown config key"),  # the CNN's job
    (["+lr=0.2"], "+lr: lr is already in the config; set it without the + (or with ++)"),
    (["~nothere"], "~nothere: not in the config, so there is nothing to delete"),
    # the override lines were read through the config, which resolved this one as an interpolation: a traceback
    (["lr=${nope}"], "lr: cannot be resolved (Interpolation key 'nope' not found)"),
    (["hydra.job.chdir=abc"], "hydra.job.chdir: 'abc' cannot be merged (Value 'abc' is not a valid bool"),
    (["hydra.verbose=3"], "hydra.verbose: 3 is not allowed; expected true, false, a logger's name"),  # traceback
    (["lr=[1,2"], "lr=[1,2: cannot be read (no viable alternative at input '[1,2'); see Hydra's override grammar"),
    (["=0.1"], "=0.1: no key before the '='"),  # a traceback
    (["lr=0.1,0.2"], "lr=0.1,0.2: a sweep of several values, which needs -m (--multirun)"),  # six lines
    (["-m", "lr=interval(0.1,0.2)"], "lr=interval(0.1,0.2): a search range, which needs a search sweeper"),  # traceback
    (["-m", "sweep=regimes", "--cfg", "job"], "--cfg and --multirun: Hydra takes one of"),  # a traceback
    (["hydra/launcher=nope"], "hydra/launcher: 'nope' is not an option; expected one of basic, joblib, population"),
    (["+experiment=baseline"], "+experiment: experiment is in the defaults list already"),
    (["hydra.job.env_set.FOO=bar"], "hydra.job.env_set.FOO: not in Hydra's config; to append to your config use "
                                    "+hydra.job.env_set.FOO=bar"),
    (["-m", "hparams_search=optuna", "lr=interval(0.001,0.1)", "optimizr=adam"], "optimizr: unknown config key"),
    (["-m", "optimizer=sgd,adam", "optimizer.momentum=0.9"],  # only Adam's jobs lack it: said so
     "optimizer.momentum: unknown config key with optimizer=adam (nothing reads it there)"),
    # a sweep config is a sweep without -m too (it had run one default job): its Adagrad jobs lack momentum
    (["sweep=lr", "optimizer.momentum=0.9"], "optimizer.momentum: unknown config key with optimizer=adagrad"),
    # --cfg shows one run's config whatever the config's mode (a review: Hydra's six lines)
    (["--cfg", "job", "sweep=lr", "lr=0.1,0.2"], "lr=0.1,0.2: a sweep of several values, which needs -m"),
    # the sweep config's own sweep of model.hidden, with model=cnn (Hydra's lines after writing multirun.yaml)
    (["-m", "sweep=regime_map_reduced", "model=cnn"],
     "model.hidden: unknown config key here, swept by hydra.sweeper.params"),
])
def test_an_option_a_config_group_lacks_or_an_empty_sweep_is_one_line(tmp_path: Path, args: list[str], error: str) -> None:
    """Hydra's error was several lines and a pointer to HYDRA_FULL_ERROR (``experiment=null``: a traceback)."""
    result = train(*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {error}") and result.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_an_empty_run_folder_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """``hydra.run.dir=`` (an unset shell variable) ran the run in the working folder (a probe)."""
    result = train("hydra.run.dir=", "epochs=1", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: hydra.run.dir: '' is not allowed; expected a folder\n"
    assert not list(tmp_path.iterdir())


def test_options_of_groups_in_other_config_folders_are_left_to_hydra(tmp_path: Path) -> None:
    """A command that adds a config folder may choose options conf/ does not have; and Hydra's own groups."""
    from optimlab.command_line import command_line_error, composition_error

    conf = REPO / "conf"
    assert command_line_error(["--config-dir", str(tmp_path), "model=resnet"], conf) is None
    assert command_line_error(["hydra.searchpath=[file://x]", "model=resnet"], conf) is None
    assert command_line_error(["hydra/launcher=nope", "model.hidden=[8]", "--cfg", "job", "lr=1"], conf) is None
    assert command_line_error(["model=cnn", "optimizer=glob(*)", "~debug", "model@foo=mlp", "seed=range(2)"],
                              conf) is None
    # Composition: with another config folder, or a glob of a group's options, Hydra decides; a search's range is
    # left out (the rest is checked); a sweep's value that reads as several (a quoted comma) is composed quoted.
    assert composition_error(["--config-dir", str(tmp_path), "foo=1"], conf) is None
    assert composition_error(["-m", "optimizer=glob(*)", "foo=1"], conf) is None
    assert composition_error(["hparams_search=optuna", "lr=tag(log, interval(0.001, 0.1))", "lr=0.1"], conf) is None
    assert composition_error(["hparams_search=optuna", "lr=tag(log, interval(0.001, 0.1))", "foo=1"], conf) == \
        "foo: unknown config key (nothing reads it); check the spelling, or see conf/"
    # a search range is composed at its start: the study began, and its first Adam trial ended it (a review)
    assert composition_error(["hparams_search=optuna", "optimizer.momentum=interval(0, 0.9)"], conf) == \
        "optimizer.momentum: unknown config key with optimizer=adam (nothing reads it there); sweep the options " \
        "that read it apart, or give it as ++optimizer.momentum=... so those jobs fail alone"
    assert composition_error(["hparams_search=optuna", "optimizer=sgd", "optimizer.momentum=interval(0, 0.9)"],
                             conf) is None
    assert composition_error(["-m", "lr=0.1,0.2", "name='a,b','c'", "model=cnn,mlp", "-p", "model"], conf) is None
    assert composition_error(["-m", "name='a,b','c'", "model=cnn,mlp", "model.hidden=[8]"], conf) == \
        "model.hidden: unknown config key (nothing reads it); check the spelling, or see conf/"
    # An integer range Optuna draws from is not listed (a probe: a billion values hung the check); shell completion's
    # install=bash is no override.
    assert composition_error(["-m", "hparams_search=optuna", "seed=range(0,1000000000)"], conf) is None
    assert composition_error(["-m", "seed=range(0,1000000000)", "lr=0.1"], conf) is None
    assert composition_error(["-sc", "install=bash"], conf) is None
    for group in ("scheduler", "logger", "callbacks", "debug"):  # a deletion of a group, no null (a review)
        assert composition_error([f"~{group}", "epochs=1"], conf) is None, group
    assert composition_error(["--help", "foo=1"], conf) is None  # Hydra's help, whatever follows
    assert composition_error(["hydra/launcher=null"], conf) == "hydra/launcher: null is not an option; choose one of " \
                                                                "its options"
    assert composition_error(["-r", "-m", "lr=1,2"], conf).startswith("--multirun and --run: Hydra takes one of")
    assert composition_error(["-m", "hydra/launcher=basic,joblib"], conf).startswith(
        "hydra/launcher=basic,joblib: a sweep of Hydra's own config (hydra/launcher) is not supported")
    # Valid commands a probe found refused: lists and quoted options of a swept group, an option's file name,
    # abbreviated long flags, a sweep config's sweeps when the sweep config is itself swept (the sweep's own config
    # has none), Hydra's own errors.
    for args in (["-m", "callbacks=default,[default,lr_monitor]"], ["-m", "callbacks=choice([early_stopping],none)"],
                 ["-m", "model='cnn','mlp'"], ["model=cnn.yaml"], ["--multi", "lr=0.1,0.2"], ["--shell", "install=bash"],
                 ["--config-d", str(tmp_path), "model=tiny"], ["sweep=lr", "lr=0.1,0.2"],
                 ["--cfg", "job", "sweep=lr", "optimizer.momentum=0.9"], ["--info", "sweep=lr", "lr=0.1"],
                 ["-m", "sweep=regime_map_reduced,seeds"], ["-m", "sweep=lr", "hydra.sweeper.params.lr='0.1,0.2'"],
                 ["debug=${trainer}"], ["-m", "scheduler=${logger}", "logger=none", "lr=0.1,0.2"],  # interpolated
                 ["--info", "plugins", "model=nope"], ["--experimental-rerun", "/tmp/0_lr=0.1/.hydra/config.pickle"]):
        assert (command_line_error(args, conf) or composition_error(args, conf)) is None, args
    # A sweeper's parameter where no config sets hydra.sweeper.params (Hydra: an AssertionError traceback), or as a
    # sweep (a probe: the advice to quote it led to that traceback): the sweep of the key itself, the same jobs.
    for given in ("hydra.sweeper.params.lr='0.1,0.2'", "+hydra.sweeper.params.lr='0.1,0.2'"):
        assert composition_error(["-m", given], conf) == "hydra.sweeper.params.lr: no config here sets hydra.sweeper." \
            "params (a sweep= or hparams_search= config does), and Hydra cannot add one from the command line; give " \
            "each parameter as a sweep of its own (lr=0.1,0.2: the same jobs)"
    assert composition_error(["-m", "hydra.sweeper.params={lr:'0.1,0.2'}"], conf).startswith(
        "hydra.sweeper.params: no config here sets hydra.sweeper.params")
    assert composition_error(["-m", "hydra.sweeper.params.lr=0.1,0.2"], conf) == "hydra.sweeper.params.lr=0.1,0.2: " \
        "Hydra reads this as a sweep of its own config, which it cannot run; sweep lr itself (lr=0.1,0.2)"
    assert composition_error(["-m", "seed=range(0,1,0)"], conf) == \
        "seed=range(0,1,0): cannot be swept (range() arg 3 must not be zero)"
    assert composition_error(["hparams_search=optuna", "model=range(0,1000000000)"], conf)  # refused, not listed


def test_a_loggers_name_may_hold_dots_that_stay_inside_its_folder(tmp_path: Path) -> None:
    """``logger.csv.name=a/../b`` is ``b``, inside the logger's folder: allowed (a review); ``../x`` is refused."""
    from optimlab.validate import validate_config

    validate_config(compose_config(*FAST, "logger=csv", "logger.csv.name=a/../b"))
    with pytest.raises(ConfigError, match=r"logger.csv.name: 'a/../../b' is not allowed"):
        validate_config(compose_config(*FAST, "logger=csv", "logger.csv.name=a/../../b"))


def test_a_precision_given_as_a_number_is_that_precision(tmp_path: Path) -> None:
    """``trainer.precision=64``, which Hydra reads as an integer, trains as ``64-true`` (a probe: it was refused,
    its message listing 64 as allowed)."""
    given, named = (run(compose_config(*FAST, "epochs=1", f"trainer.precision={p}"), tmp_path / p) for p in ("64", "64-true"))
    def results(summary: RunSummary) -> list[dict]:
        return [{key: value for key, value in row.items() if not key.endswith("_s")} for row in summary.epochs]

    assert given.config["trainer"]["precision"] == 64 and results(given) == results(named)


@pytest.mark.slow
def test_tensorboard_holds_step_and_epoch_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 512 images at batch 128: 4 steps an epoch, 8 in all; per-step scalars every 3rd step.
    summary = run(compose_config(*FAST, "data.test_every_epoch=true", "trainer.log_every_n_steps=3"), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in ("train/loss_step", "train/grad_norm", "train/weight_norm", "train/lr"):
        assert steps[tag] == [0, 3, 6], tag
    assert [row["step"] for row in summary.train_steps] == [0, 3, 6]  # the record holds what was logged
    for key, tag in STEP_SCALARS.items():
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([row[key] for row in summary.train_steps])
    first = events.Scalars("train/loss_step")[0].value
    assert first == pytest.approx(summary.epochs[0]["train_loss_initial"], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([0.1] * 3)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/acc"):
        assert len(steps[tag]) >= 2, tag  # one per epoch (test/acc: per epoch and the final test)
    assert events.Scalars("train/acc")[-1].value == pytest.approx(summary.epochs[-1]["train_acc"], rel=1e-6)


@pytest.mark.slow
def test_forced_divergence_stops_cleanly_and_exits_zero(tmp_path: Path) -> None:
    # Checked every step (the CPU default; 10 on a GPU): the bad step is refused, never applied.
    result = train("lr=1e38", *FAST, "epochs=3", "trainer.check_finite_every_n_steps=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"] is True and summary["status"] == "diverged"
    assert isinstance(summary["diverged_at_step"], int) and summary["regime"] == "diverging"
    assert len(summary["epochs"]) == 1  # stopped in the first epoch
    assert summary["divergence_reason"] == "non-finite loss or gradient"
    weights = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


@pytest.mark.slow
def test_huge_but_finite_weights_are_not_called_non_finite(tmp_path: Path) -> None:
    # lr 1e30 drives the weights to ~1e30: finite, though their float32 norm would overflow
    result = train("lr=1e30", *FAST, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["diverged"] is False and summary["status"] == "complete" and len(summary["epochs"]) == 2
    assert summary["regime"] == "diverging" and summary["epochs"][-1]["train_loss"] > 1e20


@pytest.mark.parametrize("args, words", [
    (["optimizer=nope"], ["optimizer", "nope"]),
    (["lr=-1"], ["lr", "-1"]),
])
def test_bad_values_fail_fast_with_one_clear_line(tmp_path: Path, args: list[str], words: list[str]) -> None:
    result = train(*args, f"hydra.run.dir={tmp_path / 'runs' / 'new'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert all(w in result.stderr for w in words), result.stderr
    assert list(tmp_path.iterdir()) == []  # not even the folders Hydra made for the run


@pytest.mark.slow
def test_torch_impl_reproduces_our_run_exactly(tmp_path: Path) -> None:
    ours = run(compose_config("optimizer=adam", "lr=0.001", *FAST), tmp_path / "ours")
    theirs = run(compose_config("optimizer=adam", "lr=0.001", "optimizer.impl=torch", *FAST), tmp_path / "torch")
    assert [r["train_loss"] for r in ours.epochs] == [r["train_loss"] for r in theirs.epochs]
    assert ours.test_acc == theirs.test_acc


def test_a_model_too_large_for_memory_is_one_line_naming_its_size() -> None:
    """torch's allocator's message named neither the key nor the size in words (a probe: model.hidden=[100000000]);
    raised here, not allocated: where the system overcommits, a real 292 GiB model would be killed mid-init."""
    from optimlab.build import config_errors

    message = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
               "to allocate 313600000000 bytes. Error code 12 (Cannot allocate memory)")
    with pytest.raises(ConfigError, match=r"^model: does not fit in memory: it asked for 292.1 GiB at once$"):
        with config_errors("model", {"hidden": [100000000]}):
            raise RuntimeError(message)
    with pytest.raises(ConfigError, match=r"^model: does not fit in memory \(CUDA out of memory"):
        with config_errors("model", {"hidden": [100000000]}):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 292.10 GiB")


def test_grad_noise_is_refused_with_torch_impl(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="grad_noise_std"):
        run(compose_config("optimizer.impl=torch", "optimizer.grad_noise_std=1.0"), tmp_path)


def test_sharpness_tracking_is_refused_for_gradient_ascent(tmp_path: Path) -> None:
    """``optimizer.maximize=true`` climbs the loss: a descent's threshold (2/lr) does not apply (a probe: it was
    recorded, with crossings); refused before any work."""
    with pytest.raises(ConfigError, match=r"^curvature.every_n_steps: the sharpness is tracked against a descent's"):
        run(compose_config("curvature.every_n_steps=5", "optimizer.maximize=true"), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, key", [
    ("lr=-1", "lr"), ("lr=abc", "lr"), ("lr=0", "lr"), ("lr=nan", "lr"),
    ("optimizer.lr=0", "optimizer.lr: 0 is not allowed; expected a positive number"),  # as lr=0 (a probe: it trained)
    ("optimizer=adam optimizer.betas=[0.9,1.0]", "optimizer.betas"),
    ("optimizer=adam optimizer.betas=[-0.1,0.9]", "optimizer.betas"),
    ("optimizer.momentum=-0.5", "optimizer.momentum"),
    ("optimizer.nesterov=true", "optimizer.nesterov"),
    ("model.hidden=[]", "model.hidden"), ("model.hidden=[0,5]", "model.hidden"),
    ("model.hidden=[-3]", "model.hidden"), ("model.activation=swish", "model.activation"),
    ("model=cnn model.channels=[]", "model.channels: [] is not allowed; expected a list of positive integers, e.g. "
                                    "[12,16]"),  # the CNN's example, not the MLP's [1024,128] (a probe)
    ("data.label_noise=1.5", "data.label_noise"), ("data.label_noise=-0.1", "data.label_noise"),
    ("data.subset=0", "data.subset"), ("data.subset=1000000", "data.subset"),
    ("batch_size=0", "batch_size"), ("epochs=-1", "epochs"), ("epochs=2.5", "epochs"),
    ("trainer.precision=8", "trainer.precision"), ("trainer.accelerator=tpu9", "trainer.accelerator"),
    ("+regimes.fit_accuracy=0.5", "regimes"), ("resume=/no/such/run", "resume"),
    ("resume=", "resume: '' is not allowed"),  # not a fresh run (a probe: a 10-epoch baseline started)
    ("test_ckpt=first", "test_ckpt"), ("seed=-1", "seed"), ("seed=4294967296", "seed"), ("+foo=1", "foo"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"), ("trainer.devices=2", "trainer.devices"),
    ("trainer.gradient_clip_algorithm=max", "trainer.gradient_clip_algorithm"),
    ("+trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"), ("+trainer.max_steps=5", "trainer.max_steps"),
    ("+trainer.check_val_every_n_epoch=2", "trainer.check_val_every_n_epoch"), ("+trainer.logger=false", "trainer.logger"),
    ("+trainer.callbacks=[]", "trainer.callbacks"), ("+trainer.enable_checkpointing=false", "trainer.enable_checkpointing"),
    ("+trainer.default_root_dir=/tmp", "trainer.default_root_dir"), ("trainer.limit_val_batches=0", "trainer.limit_val_batches"),
    ("trainer.overfit_batches=-1", "trainer.overfit_batches"), ("trainer.profiler=fancy", "trainer.profiler"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("+trainer.val_check_interval=1", "trainer.val_check_interval"),  # an int: validation every batch
    ("trainer.devices=true", "trainer.devices"),
    ("+trainer.max_steps=-1.0", "trainer.max_steps"),  # one_of compares types too (a review)
    ("+trainer.foo=1", "trainer.foo"), ("callbacks.model_checkpoint.monitor=train/acc", "callbacks.model_checkpoint.monitor"),
    ("callbacks=early_stopping callbacks.early_stopping.patience=-1", "callbacks.early_stopping.patience"),
    ("+callbacks.model_checkpoint.every=2", "callbacks.model_checkpoint.every"), ("+callbacks.mine=3", "callbacks.mine"),
    ("callbacks=lr_monitor callbacks.lr_monitor.logging_interval=hour", "callbacks.lr_monitor"),
    ("+callbacks.mine._target_=no.such.Callback", "callbacks.mine._target_"), ("logger=csv +logger.csv.flush_every=3", "logger.csv.flush_every"),
    ("optimized_metric=test/acc", "optimized_metric"),
    ("callbacks=none test_ckpt=best", "test_ckpt"),
    ("model=cnn model.kernel_size=100", "model.kernel_size"), ("model=cnn model.pool_stride=30", "model.pool_stride"),
    ("model=cnn model.kernel_size=[3,3]", "model.kernel_size: [3, 3] is not allowed; expected an integer"),  # not "a number"
    ("scheduler=step +scheduler.last_epoch=5", "scheduler.last_epoch: 5 is not allowed"),  # torch's five-line message
    ("optimizer=adam optimizer.betas=0.9", "optimizer.betas: 0.9 is not allowed; expected a pair"),
    ("model.init_std=true", "model.init_std: True is not allowed"), ("model.dropout=false", "model.dropout"),  # bools
    ("model.hidden=[true]", "model.hidden"), ("model=cnn model.pool_stride=true", "model.pool_stride"),
    ("callbacks=early_stopping callbacks.early_stopping.monitor=val/acc", "callbacks.early_stopping.mode"),
    ("callbacks.model_checkpoint.monitor=val/acc", "callbacks.model_checkpoint.mode"),  # mode min: the worst epoch
    ("callbacks.model_checkpoint.filename=last", "callbacks.model_checkpoint.filename"),  # the resume point
    ("+callbacks.stop._target_=lightning.pytorch.callbacks.EarlyStopping +callbacks.stop.monitor=val/acc",
     "callbacks.stop.mode"),  # any entry, Lightning's mode min where none is given
    ("model._target_=math.pi", "model._target_"),  # not a class or function
    ("test_ckpt=best callbacks.model_checkpoint.save_top_k=3", "callbacks.model_checkpoint.save_top_k"),
    ("test_ckpt=best callbacks.model_checkpoint.save_top_k=0", "callbacks.model_checkpoint.save_top_k"),
    ("trainer.enable_model_summary=abc", "trainer.enable_model_summary"), ("+trainer.inference_mode=abc", "trainer.inference_mode"),
    ("callbacks.model_checkpoint.save_on_train_epoch_end=abc", "callbacks.model_checkpoint.save_on_train_epoch_end"),
    ("+logger.tensorboard.log_graph=abc", "logger.tensorboard.log_graph"),  # flags of the Trainer, callbacks, loggers
    ("logger=csv +logger.csv.flush_logs_every_n_steps=0", "logger.csv.flush_logs_every_n_steps: 0 is not allowed"),
    ("logger=many +logger.csv.flush_logs_every_n_steps=abc", "logger.csv.flush_logs_every_n_steps"),  # a mid-run crash
    ("logger=csv logger.csv.name=../../elsewhere", "logger.csv.name"),  # logs outside the run's folder
    ("logger.tensorboard.version=/tmp/elsewhere", "logger.tensorboard.version"),
    ("+logger.tensorboard.save_dir=/dev/null/tb", "logger.tensorboard.save_dir"),  # found after the folder was made
    ("data.subset=256 data.val_size=128 trainer.limit_val_batches=0.1", "trainer.limit_val_batches"),  # one batch x 0.1
    ("data.subset=256 trainer.limit_test_batches=0.05", "trainer.limit_test_batches"),  # found after training, before
    ("data.subset=256 trainer.overfit_batches=0.01", "trainer.overfit_batches"),  # its 5 validation batches: none
    pytest.param("trainer.precision=16-mixed", "trainer.precision", marks=NEEDS_NO_GPU),
    pytest.param("trainer.accelerator=gpu", "trainer.accelerator", marks=NEEDS_NO_GPU),
    ("optimizer=adagrad optimizer.lr_decay=-1", "optimizer.lr_decay"),
    ("scheduler=step +scheduler.foo=1", "scheduler.foo"),
    ("optimizer=adam optimizer.eps=-1", "optimizer.eps"), ("optimizer.lr=abc", "optimizer.lr"),
    ("epochs=0", "epochs"), ("regimes.fit_acc=abc", "regimes.fit_acc"), ("regimes.fit_acc=-5", "regimes.fit_acc"),
    ("regimes.window=0", "regimes.window"), ("curvature.every_n_steps=0", "curvature.every_n_steps"),
    ("curvature.probe_size=-1", "curvature.probe_size"), ("curvature.tol=abc", "curvature.tol"),
    ("curvature.iters=1", "curvature.iters"),  # a warm start that one product never improves
    ("lr=1e39", "lr: 1e+39 is not allowed; expected at most 3.402823e+38, the largest float32"),  # beyond the weights' dtype
    ("optimizer.weight_decay=1e39", "optimizer.weight_decay"),
    ("scheduler=step scheduler.step_size=0", "scheduler.step_size"), ("scheduler=step scheduler.gamma=-1", "scheduler.gamma"),
    ("scheduler=step scheduler.gamma=abc", "scheduler.gamma"), ("scheduler=cosine scheduler.T_max=0", "scheduler.T_max"),
    ("scheduler=cosine scheduler.eta_min=-1", "scheduler.eta_min"),
    ("data.subset=256 trainer.limit_train_batches=0.1", "trainer.limit_train_batches"),  # 2 batches x 0.1: none
])
def test_bad_config_values_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    cfg = compose_config(*override.split())
    with pytest.raises((ConfigError, DataError)) as err:
        run(cfg, tmp_path / "run")
    assert key in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_epochs_and_trainer_max_epochs_are_one_setting(tmp_path: Path) -> None:
    cfg = compose_config(*FAST, "trainer.max_epochs=1")
    summary = run(cfg, tmp_path / "given", ["trainer.max_epochs=1"])
    assert len(summary.epochs) == 1 and summary.config["epochs"] == summary.config["trainer"]["max_epochs"] == 1
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs: 3 contradicts epochs: 2; they are one setting"):
        run(compose_config("epochs=2", "trainer.max_epochs=3"), tmp_path / "both", ["epochs=2", "trainer.max_epochs=3"])
    assert not (tmp_path / "both").exists()


@pytest.mark.slow
def test_the_optimizers_own_lr_is_the_one_recorded(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run(compose_config(*FAST, "epochs=1", "optimizer.lr=0.5"), tmp_path)  # top-level lr stays 0.1
    assert summary.run.lr == 0.5 and summary.description["lr"] == 0.5
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/lr")] == [0.5]


@pytest.mark.slow
def test_sharpness_tracking_is_recorded_per_epoch_and_explains_divergence(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run(compose_config("lr=2.0", "data.subset=2000", "data.val_size=500", "epochs=2",
                                 "curvature.every_n_steps=4", "curvature.probe_size=256", "curvature.log_spaced_start=false",
                                 "trainer.progress_bar=false"), tmp_path)
    curvature = summary.curvature
    assert curvature["measurements"] == 2 * 16 // 4 and curvature["threshold_formula"] == "2/lr"
    assert curvature["first_crossing_step"] == 4 and curvature["crossing_threshold"] == pytest.approx(1.0)
    for row in summary.epochs:
        assert row["threshold_last"] == pytest.approx(1.0) and row["sharpness_max"] >= row["sharpness_last"]
    assert summary.epochs[0]["sharpness_crossed_at_step"] == 4
    assert summary.regime == "diverging"
    # measured every 4 steps from step 4 (log_spaced_start off): a crossing may have come before the first
    assert (f"sharpness {curvature['crossing_sharpness']:.3g} crossed 2/lr = 1 at step 4 (measured from step 4)"
            in summary.regime_evidence)
    assert summary.regime_measures["sharpness_max"] == curvature["sharpness_max"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["curvature"] == curvature and saved["epochs"][1]["threshold_last"] == pytest.approx(1.0)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("curvature/sharpness")] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert len(events.Scalars("curvature/threshold")) == 8


def test_compiled_and_plain_checkpoints_share_parameter_names() -> None:
    from optimlab.build import build_parts

    plain = build_parts(compose_config()).module.state_dict()
    compiled = build_parts(compose_config("trainer.compile=true")).module
    assert list(compiled.state_dict()) == list(plain)
    compiled.load_state_dict(plain)  # and the other way round: same keys, same shapes


def test_the_result_line_counts_the_steps_a_run_too_short_to_time_took() -> None:
    """The throughput leaves out the first step: a one-step run (debug=fdr) has none, but it did step."""

    one = RunSummary(status="complete", config={}, epochs=[{"epoch": 1}], steps=1, steps_per_s=None, regime="slow")
    assert result_line(one).endswith("1 epoch, 1 step, 0.0s wall")
    timed = RunSummary(status="complete", config={}, steps=40, steps_per_s=12.5, regime="slow")
    assert result_line(timed).endswith("0 epochs, 12.5 steps/s, 0.0s wall")


@pytest.mark.parametrize("threads", [1, 2])
def test_the_device_names_the_cpu_threads_a_run_had(threads: int) -> None:
    """A forked population's members ran with one thread each: "1 thread" (a probe read "1 threads")."""
    from optimlab.record import device_name

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert device_name(torch.device("cpu")).endswith(f", {threads} thread{'s' if threads > 1 else ''})")
    finally:
        torch.set_num_threads(before)
