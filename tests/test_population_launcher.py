"""The population launcher (``python train.py -m hydra/launcher=population``): how jobs are sorted
and grouped (fast, composed in-process), and end to end against the basic launcher (slow)."""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import pickle
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import processes
from conftest import CONF, compose_config, run_script
from hydra_plugins.optimlab_population.population_launcher import PopulationLauncher
from optimlab.hydra_job import hydra_config_of
from optimlab.population import launcher, plan
from optimlab.population.cluster import Executor
from optimlab.population.launcher import PopulationCrashed, finish_member, train_members
from optimlab.population.plan import Job, PlanError, check_plan_is_the_sweeps, group, population_key, why_alone
from optimlab.report import main as report_main
from optimlab.summary import read_summary

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.subset=256", "data.val_size=500", "epochs=1", "model.hidden=[16]", "trainer.accelerator=cpu"]


def train(*args: str) -> subprocess.CompletedProcess:
    return run_script(REPO / "train.py", "-m", *args)


def scalar_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard holds in ``folder``: (step, value) per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def summaries(sweep_dir: Path) -> dict[str, dict]:
    """Each job folder's summary.json by folder name."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))}


# ---------------------------------------------------------------------------- composing the jobs

SHAPES = [["optimizer=adam", "lr=0.001", "model.hidden=[8]", "seed=0"],
          ["optimizer=adam", "lr=0.1", "model.hidden=[2,4]", "seed=2"],       # the shape's second job: checked
          ["optimizer=adam", "lr=3", "model.hidden=[32]", "seed=1"],          # copied
          ["optimizer=sgd", "lr=0.5", "model.hidden=[8]", "seed=0"],          # another group choice
          ["optimizer=sgd", "lr=0.25", "model.hidden=[8]", "seed=7"],
          ["optimizer=sgd", "lr=2e-3", "model.hidden=[8]", "seed=null"],      # a null value: a shape of its own
          ["lr=0.5", "+trainer.gradient_clip_val=1.0", "epochs=2"],           # an addition belongs to the shape
          ["lr=0.25", "+trainer.gradient_clip_val=1.0", "epochs=3"],
          ["lr=0.125", "+trainer.gradient_clip_val=2.0", "epochs=3"],
          ["model=cnn", "name='a=b'", "hydra.job.chdir=true"],                    # a hydra key belongs to it too
          ["model=cnn", "name=c", "hydra.job.chdir=true"],
          ["model=cnn", "name=d", "hydra.job.chdir=true"],
          ["lr=0.1", "model.hidden=[8]", "model.hidden.0=4", "epochs=2"],     # an element of a swept list
          ["lr=0.1", "model.hidden=[16,16]", "model.hidden.0=4", "epochs=2"],
          ["lr=0.2", "model.hidden=[32]", "model.hidden.0=4", "epochs=2"],    # its same line set again after
          ["model.hidden=[8,8]", "model.hidden.0=7", "model.hidden.1=3", "seed=0"],
          ["model.hidden=[8,8]", "model.hidden.0=7", "model.hidden.1=3", "seed=1"],
          ["model.hidden=[8,8]", "model.hidden.0=7", "model.hidden.1=4", "seed=0"]]  # hidden, then hidden.0 again


@pytest.fixture()
def loaders():
    """Hydra's own config loader, the master config of a multirun, and the shape-caching loader."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from optimlab.population.compose import ShapeCachingLoader

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        hydra_loader = GlobalHydra.instance().config_loader()
        master = hydra_loader.load_configuration("config", ["hydra/launcher=population"], RunMode.MULTIRUN)
        yield hydra_loader, master, ShapeCachingLoader(hydra_loader)


def test_jobs_composed_by_shape_equal_hydras_composition(loaders) -> None:
    hydra_loader, master, caching = loaders
    for overrides in SHAPES:
        expected = OmegaConf.to_yaml(hydra_loader.load_sweep_config(master, overrides))
        assert OmegaConf.to_yaml(caching.load_sweep_config(master, overrides)) == expected, overrides
    # adam, sgd, sgd with seed null, each addition's value (a shape of its own: checked when a second job
    # comes), cnn
    assert [shape.copies_match for shape in caching.shapes.values()] == [True, True, None, True, None, True, True, True]
    # A copy is Hydra's config in its flags too, and its own: changing it leaves the shape's template alone.
    overrides = ["optimizer=adam", "lr=0.02", "model.hidden=[4]", "seed=3"]
    copied, composed = caching.compose(master, overrides), hydra_loader.load_sweep_config(master, overrides)
    for node in (lambda c: c, lambda c: c.hydra, lambda c: c.model):
        assert OmegaConf.is_struct(node(copied)) == OmegaConf.is_struct(node(composed))
        assert OmegaConf.is_readonly(node(copied)) == OmegaConf.is_readonly(node(composed))
    copied.lr = 9.0
    assert caching.compose(master, overrides).lr == 0.02


def test_a_copy_sets_the_values_that_changed_and_those_on_keys_they_touch(loaders) -> None:
    """changed: of a job's plain overrides, a copy of its shape's first job sets those whose line differs
    and those on a key one of them holds or is held by (Hydra sets them in order); the others it has."""
    from optimlab.population.compose import changed, overlap

    _, _, caching = loaders
    first = ("optimizer=sgd", "lr=0.1", "model.hidden=[8]", "model.hidden.0=4", "model.activation=tanh", "epochs=2")
    job = caching.parse(["optimizer=sgd", "lr=0.2", "model.hidden=[16]", "model.hidden.0=4", "model.activation=tanh",
                         "epochs=2"])
    plain = [caching.is_plain(o) for o in job]
    assert plain == [False, True, True, True, True, True]
    assert changed(job, plain, first) == [False, True, True, True, False, False]
    # set again in turn: hidden.1 changed, so hidden (which holds it) is set, so hidden.0 (which it holds) is too
    first = ("model.hidden=[8,8]", "model.hidden.0=7", "model.hidden.1=3", "seed=0")
    job = caching.parse(["model.hidden=[8,8]", "model.hidden.0=7", "model.hidden.1=4", "seed=0"])
    assert changed(job, [True] * 4, first) == [True, True, True, False]
    assert overlap("model.hidden", "model.hidden.0") and overlap("a[0]", "a") and overlap("a", "a")
    assert not overlap("model.hidden", "model.hiddens") and not overlap("lr", "optimizer.lr")


def test_a_shape_whose_copies_differ_is_composed_in_full(loaders, monkeypatch: pytest.MonkeyPatch) -> None:
    hydra_loader, master, caching = loaders
    wrong = caching.copy_with

    def copy_with(*args):
        config = wrong(*args)
        config.lr = -1.0
        return config

    monkeypatch.setattr(caching, "copy_with", copy_with)
    for overrides in SHAPES[:3]:
        expected = OmegaConf.to_yaml(hydra_loader.load_sweep_config(master, overrides))
        assert OmegaConf.to_yaml(caching.load_sweep_config(master, overrides)) == expected, overrides
    assert [shape.copies_match for shape in caching.shapes.values()] == [False]


def test_task_configs_equal_the_copy_out_of_hydras_composition(loaders) -> None:
    """The task's config the loader makes for a job (a copy of its shape's task part) is what Hydra's
    composition gives without its hydra node, flags included; a shape whose task copies differ gets
    the copy out of the job's config from then on."""
    from optimlab.population.compose import task_part

    hydra_loader, master, caching = loaders
    hydras = [task_part(hydra_loader.load_sweep_config(master, overrides)) for overrides in SHAPES]
    for overrides, expected in zip(SHAPES + SHAPES, hydras + hydras):  # the second time round every shape has been checked
        task = caching.task_config(master, overrides, caching.compose(master, overrides))
        assert OmegaConf.to_yaml(task) == OmegaConf.to_yaml(expected), overrides
        for node in (lambda c: c, lambda c: c.model, lambda c: c.trainer):
            assert OmegaConf.is_struct(node(task)) == OmegaConf.is_struct(node(expected))
    assert [shape.task_copies_match for shape in caching.shapes.values()] == [True] * 8
    task.lr = 9.0  # a job's own
    assert caching.task_config(master, SHAPES[-1], caching.compose(master, SHAPES[-1])).lr != 9.0

    fresh = type(caching)(hydra_loader)
    fresh.compose(master, SHAPES[0])
    (shape,) = fresh.shapes.values()
    wrong = task_part(shape.config)
    wrong.epochs = 99
    shape.task_pickled = pickle.dumps(wrong)
    for overrides in SHAPES[1:3]:
        task = fresh.task_config(master, overrides, fresh.compose(master, overrides))
        assert OmegaConf.to_yaml(task) == OmegaConf.to_yaml(task_part(hydra_loader.load_sweep_config(master, overrides)))
    assert shape.task_copies_match is False


def test_the_launcher_gets_the_config_composed_for_the_sweepers_check(loaders, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each job composed once for the sweeper's check and handed to the launcher's request (the
    same object, as Hydra composes it); a third request composes it again; another master config
    starts afresh."""
    hydra_loader, master, caching = loaders
    composed: list[tuple[str, ...]] = []
    compose = caching.compose
    monkeypatch.setattr(caching, "compose", lambda m, o: composed.append(tuple(o)) or compose(m, o))
    checked = [caching.load_sweep_config(master, overrides) for overrides in SHAPES[:4]]  # the sweeper's check
    launched = [caching.load_sweep_config(master, overrides) for overrides in SHAPES[:4]]  # the launcher's
    assert composed == [tuple(o) for o in SHAPES[:4]] and all(a is b for a, b in zip(checked, launched))
    for overrides, config in zip(SHAPES[:4], launched):
        assert OmegaConf.to_yaml(config) == OmegaConf.to_yaml(hydra_loader.load_sweep_config(master, overrides))
    again = caching.load_sweep_config(master, SHAPES[0])
    assert len(composed) == 5 and again is not launched[0]
    other = copy.deepcopy(master)
    assert caching.load_sweep_config(other, SHAPES[0]) is not again and len(composed) == 6


def test_a_bad_value_fails_as_hydra_says(loaders) -> None:
    from hydra.errors import ConfigCompositionException

    hydra_loader, master, caching = loaders
    for overrides in SHAPES[:2]:
        caching.load_sweep_config(master, overrides)
    with pytest.raises(ConfigCompositionException, match="Could not override 'optimizer.nope'"):
        caching.load_sweep_config(master, ["optimizer=adam", "optimizer.nope=1"])
    # A null replaces the curvature node; a copy of that job could take a list or a number where Hydra refuses them.
    for seed in (0, 1, 2):
        caching.load_sweep_config(master, ["curvature=null", f"seed={seed}"])
    with pytest.raises(ConfigCompositionException, match=r"Error merging override curvature=\[1\]"):
        caching.load_sweep_config(master, ["curvature=[1]", "seed=0"])
    assert caching.load_sweep_config(master, ["curvature=5", "seed=0"]).curvature == 5  # as Hydra takes it


class RecordingCallbacks:
    """Hydra callbacks that note what they were called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def on_job_start(self, config, task_function, **kwargs) -> None:
        self.calls.append(("start", str(config.hydra.runtime.output_dir)))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        self.calls.append(("end", job_return.status.name))


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_a_composed_job_runs_as_hydras_run_job_runs_it(loaders, tmp_path: Path, fails: bool) -> None:
    """run_composed_job (the population launcher's jobs) and Hydra's run_job, each given the same
    composed job: the task sees the same config, HydraConfig, working folder (hydra.job.chdir) and
    environment (hydra.job.env_set); the same .hydra/ files (hydra.output_subdir set), callbacks
    and JobReturn; the working folder is restored after."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode

    from optimlab.hydra_job import run_composed_job

    hydra_loader = loaders[0]
    seen: dict[str, tuple] = {}
    cwd = os.getcwd()

    def task(cfg) -> float:
        seen[way] = (os.getcwd(), os.environ.get("OPTIMLAB_TEST_ENV"), HydraConfig.get().runtime.output_dir,
                     OmegaConf.to_yaml(cfg, resolve=True))
        if fails:
            raise ValueError("the task failed")
        return 0.5

    results = {}
    for way in ("hydra", "ours"):
        master = hydra_loader.load_configuration(
            "config", ["hydra/launcher=population", f"hydra.sweep.dir={tmp_path / way}", "hydra.job.chdir=true",
                       "hydra.output_subdir=.hydra", "+hydra.job.env_set.OPTIMLAB_TEST_ENV=on"], RunMode.MULTIRUN)
        callbacks = RecordingCallbacks()
        context = HydraContext(config_loader=hydra_loader, callbacks=callbacks)
        job, = plan.compose_jobs(context, master, [["lr=0.5", "seed=3"]], 7)
        if way == "hydra":
            ret = run_job(task, job.sweep_config, "hydra.sweep.dir", "hydra.sweep.subdir", context)
        else:
            ret = run_composed_job(context, task, job.sweep_config, job.config, job.run_dir)
        assert os.getcwd() == cwd and "OPTIMLAB_TEST_ENV" not in os.environ
        files = {p.name: p.read_text() for p in (job.run_dir / ".hydra").iterdir()}
        results[way] = [ret.status, ret.overrides, OmegaConf.to_yaml(ret.cfg), ret.task_name, ret.working_dir,
                        callbacks.calls, seen[way], files]
        assert ret.working_dir == str(job.run_dir) == seen[way][0] == seen[way][2]
        if fails:
            with pytest.raises(ValueError, match="the task failed"):
                ret.return_value
        else:
            assert ret.return_value == 0.5
    ours = json.loads(json.dumps(results["ours"], default=str).replace(str(tmp_path / "ours"), str(tmp_path / "hydra")))
    assert json.loads(json.dumps(results["hydra"], default=str)) == ours
    assert results["ours"][0].name == ("FAILED" if fails else "COMPLETED")
    assert sorted(results["ours"][-1]) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


# ---------------------------------------------------------------------------- sorting and grouping


def test_the_plugin_is_registered_with_its_knobs() -> None:
    node = ConfigStore.instance().load("hydra/launcher/population.yaml").node
    assert node._target_ == "hydra_plugins.optimlab_population.population_launcher.PopulationLauncher"
    # The plan's knobs read the run config's population node (the issue's population.max_members, ...).
    for overrides, expected in (([], (64, None, False)),
                                (["population.max_members=5", "population.max_memory_gib=1.5", "population.dry_run=true"],
                                 (5, 1.5, True)),
                                (["hydra.launcher.max_members=7", "hydra.launcher.max_memory_gib=2"], (7, 2, False))):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=population", *overrides], return_hydra_config=True)
        knobs = cfg.hydra.launcher
        assert (knobs.max_members, knobs.max_memory_gib, knobs.dry_run) == expected, overrides
    other_app = OmegaConf.create({"hydra": {"launcher": node}})  # a config without the node: the defaults
    knobs = other_app.hydra.launcher
    assert (knobs.max_members, knobs.max_memory_gib, knobs.dry_run) == (64, None, False)
    for bad, message in (({"max_members": 0}, r"population.max_members \(hydra.launcher.max_members\): 0 is not allowed"),
                         ({"max_members": "abc"}, "max_members.*'abc' is not allowed; expected an integer >= 1"),
                         ({"dry_run": "maybe"}, r"population.dry_run \(hydra.launcher.dry_run\): 'maybe' is not allowed"),
                         ({"dry_run": 1}, "dry_run.*1 is not allowed; expected true or false"),
                         ({"max_memory_gib": 0}, r"population.max_memory_gib \(hydra.launcher.max_memory_gib\): 0 is not "
                                                 "allowed; expected null or a positive number"),
                         ({"max_memory_gib": "lots"}, "max_memory_gib.*'lots' is not allowed"),
                         ({"max_memory_gib": float("inf")}, "max_memory_gib.*inf is not allowed"),
                         ({"max_memory_gib": True}, "max_memory_gib.*True is not allowed")):
        with pytest.raises(ValueError, match=message):
            PopulationLauncher(**bad)


@pytest.mark.parametrize("options,key", [({"executor": "nope"}, "hydra.launcher.executor"),
                                         ({"max_parallel": 0}, "hydra.launcher.max_parallel"),
                                         ({"executor": "submitit_local", "submitit": {"bogus": 1}},
                                          "hydra.launcher.submitit"),
                                         ({"executor": "submitit_local", "submitit": {"timeout_min": "soon"}},
                                          "hydra.launcher.submitit"),
                                         ({"executor": "submitit_slurm"}, "hydra.launcher.executor=submitit_slurm")])
def test_bad_launcher_options_are_refused_before_anything_is_written(tmp_path: Path, options: dict,
                                                                      key: str) -> None:
    """(There is no SLURM here: submitit finds no srun.)"""
    with pytest.raises(ValueError, match=key):
        PopulationLauncher(submitit_folder=str(tmp_path / "submitit" / "%j"), **options)
    assert not (tmp_path / "submitit").exists()


def test_a_swept_plan_is_refused_in_one_line_before_any_job_folder() -> None:
    """population.* plans the whole sweep, read once: a per-job value would be ignored, so it is refused."""
    master = OmegaConf.create({"population": {"max_members": 64, "dry_run": False}})

    def job(num: int, max_members: int, overrides: list[str]) -> Job:
        config = OmegaConf.create({"population": {"max_members": max_members, "dry_run": False}})
        return Job(num, overrides, config, Path(str(num)))

    check_plan_is_the_sweeps(master, [job(0, 64, ["lr=0.1"]), job(1, 64, ["lr=1"])])
    swept = [job(0, 64, ["lr=0.1"]), job(1, 8, ["lr=0.1", "population.max_members=8"])]
    with pytest.raises(PlanError, match=r"^population.max_members=8: the population launcher's plan is one for the "
                                        r"whole sweep \(job #1 would differ\)"):
        check_plan_is_the_sweeps(master, swept)


@pytest.mark.skipif(not plan.can_fork(), reason="forks")
def test_jobs_classified_in_forked_processes_get_the_verdicts_of_this_one(loaders, mnist_root: Path,
                                                                        tmp_path: Path) -> None:
    """classify_all with three processes: every job's error, reason to run alone and population key
    are those classify gives it here (an invalid job's error with its message)."""
    hydra_loader, master, _ = loaders
    grids = [["lr=0.1"], ["lr=-1"], ["lr=0.2", "trainer.detect_anomaly=true"], ["lr=0.3", "seed=2"], ["optimizer=adam"],
             ["data.val_size=70000"], ["lr=0.4"]]

    def jobs() -> list[Job]:
        return [Job(i, overrides, hydra_loader.load_sweep_config(master, [*overrides, f"hydra.sweep.dir={tmp_path}"]),
                    tmp_path / str(i)) for i, overrides in enumerate(grids)]

    here, forked = jobs(), jobs()
    for job in here:
        plan.classify(job)
    plan.classify_all(forked, processes=3)
    verdicts = [[(type(j.error), str(j.error)), j.alone, j.key] for j in forked]
    assert verdicts == [[(type(j.error), str(j.error)), j.alone, j.key] for j in here]
    assert [j.error is not None for j in here] == [False, True, False, False, False, True, False]
    assert [j.alone is not None for j in here] == [False, False, True, False, False, False, False]


def test_the_forked_checks_get_whole_check_groups_in_shares_of_about_as_many_jobs() -> None:
    """shares_of: the jobs that differ only in seed / data.seed / lr / optimizer.lr / optimizer.weight_decay
    go to one process (so they share a check), the shares hold about as many jobs each, in job order, every
    job once; a group larger than a share (a sweep of learning rates alone) is cut, so every process still
    gets work."""
    grid = [[f"optimizer={o}", f"model.hidden=[{w}]", f"lr={lr}", f"seed={s}"] for o in ("sgd", "adam")
            for w in (2, 8) for lr in (0.1, 1) for s in range(3)]
    grid += [["optimizer.lr=0.1", "data.seed=4"], ["optimizer.weight_decay=0.1", "+data.seed=5"]]
    jobs = [Job(i, overrides, OmegaConf.create({}), Path(str(i))) for i, overrides in enumerate(grid)]
    assert [len(group) for group in plan.check_groups(jobs)] == [6, 6, 6, 6, 2]
    shares = plan.shares_of(jobs, 2)
    assert sorted(job.num for share in shares for job in share) == list(range(len(jobs)))
    assert all([job.num for job in share] == sorted(job.num for job in share) for share in shares)
    assert sorted(map(len, shares)) == [12, 14]
    where = {job.num: k for k, share in enumerate(shares) for job in share}
    for members in plan.check_groups(jobs):
        assert len({where[job.num] for job in members}) == 1
    lrs_alone = [Job(i, [f"lr={i + 1}"], OmegaConf.create({}), Path(str(i))) for i in range(7)]
    assert [[job.num for job in share] for share in plan.shares_of(lrs_alone, 3)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_job_that_differs_from_a_checked_one_only_in_its_seeds_or_step_sizes_is_not_checked_again(
        loaders, mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """classify with the keys of the jobs that passed: a job that differs from one of them only in seed,
    data.seed, lr, optimizer.lr or optimizer.weight_decay (values that pass their rules and that its
    optimizer takes) gets its verdict without a check of its own; every other job (another value, an
    invalid one, a new config) is checked, and the verdicts are those of a check of each."""
    hydra_loader, master, _ = loaders
    grids = [["lr=0.1", "seed=0"], ["lr=0.1", "seed=5"], ["lr=0.1", "data.seed=9"], ["lr=0.2", "seed=5"],
             ["lr=0.1", "seed=-1"], ["lr=0.1", "data.seed=-3"], ["lr=-1", "seed=1"], ["lr=-1", "seed=2"],
             ["lr=0.1", "optimizer.weight_decay=0.01", "seed=6"], ["lr=0.1", "optimizer.weight_decay=-1", "seed=7"],
             ["optimizer.lr=0.3", "seed=8"], ["optimizer.lr=-0.3", "seed=9"], ["lr=0.1", "epochs=2", "seed=10"],
             ["optimizer=adam", "lr=0.1", "seed=11"], ["optimizer=adam", "lr=0.5", "seed=12"],
             ["optimizer=adam", "lr=0.1", "optimizer.betas=[0.9,2.0]", "seed=13"]]

    def jobs() -> list[Job]:
        return [Job(i, overrides, hydra_loader.load_sweep_config(master, [*overrides, f"hydra.sweep.dir={tmp_path}"]),
                    tmp_path / str(i)) for i, overrides in enumerate(grids)]

    each = jobs()
    for job in each:
        plan.classify(job)
    checked: list[int] = []
    check = plan.check
    monkeypatch.setattr(plan, "check", lambda cfg: checked.append(int(cfg.seed)) or check(cfg))
    passed: set[str] = set()
    remembered = jobs()
    for job in remembered:
        plan.classify(job, passed)
    # not seeds 5, 9 (data.seed), 5 (lr 0.2), 6 (weight decay), 8 (optimizer.lr), 12 (adam, lr 0.5): each like
    # a job that passed; failures are not kept, nor are their values taken unchecked
    assert checked == [0, -1, 0, 1, 2, 7, 9, 10, 11, 13]
    assert [[(type(j.error), str(j.error)), j.alone, j.key] for j in remembered] == \
        [[(type(j.error), str(j.error)), j.alone, j.key] for j in each]
    assert [j.error is not None for j in each] == [False, False, False, False, True, True, True, True,
                                                   False, True, False, True, False, False, False, True]


def test_members_may_differ_in_member_wise_settings_only() -> None:
    key = population_key(compose_config())
    for same in (["lr=0.5"], ["seed=3"], ["optimizer.weight_decay=0.01"], ["data.label_noise=0.2"],
                 ["model.init=glorot"], ["name=other"], ["regimes.fit_acc=0.5"], ["trainer.log_every_n_steps=7"],
                 ["logger=csv"], ["logger=none"], ["callbacks=lr_monitor"], ["callbacks=early_stopping"]):
        assert population_key(compose_config(*same)) == key, same
    for other in (["batch_size=64"], ["epochs=3"], ["data.subset=1000"], ["model.hidden=[32]"],
                  ["optimizer=adam"], ["optimizer.momentum=0.9"], ["trainer.precision=64-true"],
                  ["data.test_every_epoch=false"], ["curvature.every_n_steps=10"], ["scheduler=cosine"],
                  ["test_ckpt=best"]):
        assert population_key(compose_config(*other)) != key, other
    assert why_alone(compose_config("curvature.every_n_steps=10")) is None  # tracked members share a population
    for schedule in (["scheduler=cosine"], ["scheduler=step", "optimizer=adam"]):  # each member its own scheduler
        assert why_alone(compose_config(*schedule)) is None, schedule
    for clip in (["trainer.gradient_clip_val=1.0"], ["trainer.gradient_clip_val=0.1", "trainer.gradient_clip_algorithm=value"]):
        assert why_alone(compose_config(*clip)) is None, clip  # each member clipped by its own norm
    assert why_alone(compose_config("callbacks=early_stopping")) is None  # each member stops where its run stops
    # each member tested from the epoch its run's ModelCheckpoint keeps
    assert why_alone(compose_config("test_ckpt=best")) is None
    assert why_alone(compose_config("callbacks=lr_monitor")) is None  # each member's epoch-start lrs logged as its run's
    assert why_alone(compose_config("callbacks=lr_monitor", "+callbacks.lr_monitor.log_momentum=false")) is None
    for logger in ("csv", "many", "none"):  # each member's record replayed into its run's loggers
        assert why_alone(compose_config(f"logger={logger}")) is None, logger
    assert why_alone(compose_config("experiment=overfit_early_stop", "trainer.accelerator=cpu")) is None
    # each member's dropout masks and gradient noise drawn from its own generator (on the CPU)
    assert why_alone(compose_config("model.dropout=0.5", "optimizer.grad_noise_std=0.1", "trainer.accelerator=cpu")) is None
    assert why_alone(compose_config("experiment=grad_noise", "trainer.accelerator=cpu")) is None
    # populations on machines the plan cannot see (SLURM): accelerator=auto may be a GPU there
    assert why_alone(compose_config("model.dropout=0.5", "trainer.accelerator=auto"), elsewhere=True) == \
        "model.dropout > 0 off the CPU"
    assert why_alone(compose_config("model.dropout=0.5", "trainer.accelerator=cpu"), elsewhere=True) is None


# A scheduler of torch's in place of conf/scheduler/step.yaml's StepLR.
def scheduler(target: str, *options: str) -> list[str]:
    return ["scheduler=step", f"scheduler._target_=torch.optim.lr_scheduler.{target}", "~scheduler.step_size",
            "~scheduler.gamma", *options]


@pytest.mark.parametrize("overrides, reason", [
    (["model.dropout=0.5", "trainer.accelerator=gpu"], "model.dropout > 0 off the CPU"),
    # Each member steps its own scheduler on a stand-in of its optimizer: one that changes more than the lr
    # (a cyclic momentum) cannot be followed member by member, one whose step fails fails the run too.
    ([*scheduler("CyclicLR", "+scheduler.base_lr=0.01", "+scheduler.max_lr=0.1"), "optimizer.momentum=0.9"],
     "a learning-rate scheduler that changes momentum"),
    ([*scheduler("CyclicLR", "+scheduler.base_lr=0.01", "+scheduler.max_lr=0.1", "+scheduler.base_momentum=0.5",
                 "+scheduler.max_momentum=0.5"), "optimizer.momentum=0.9"],  # set once, when it is built
     "a learning-rate scheduler that changes momentum"),
    (scheduler("ReduceLROnPlateau"), "a learning-rate scheduler that fails on a stand-in optimizer (TypeError: "),
    (["optimizer.grad_noise_std=0.01", "trainer.accelerator=gpu"], "optimizer.grad_noise_std > 0 off the CPU"),
    (["callbacks=lr_monitor", "callbacks.lr_monitor.logging_interval=step"], "lr_monitor"),
    (["callbacks=lr_monitor", "+callbacks.lr_monitor.log_momentum=true"], "lr_monitor"),
    # Lightning's default interval (None) logs every step too
    (["callbacks=lr_monitor", "~callbacks.lr_monitor.logging_interval"], "callbacks.lr_monitor.logging_interval=None"),
    (["callbacks=early_stopping", "+callbacks.early_stopping.stopping_threshold=0.1"], "early_stopping"),
    # the setting is named, not the callback, which a population follows (a probe found the reason misleading)
    (["callbacks=early_stopping", "+callbacks.early_stopping.check_finite=false"],
     "callback settings a population does not follow (callbacks.early_stopping.check_finite=False)"),
    # its run applies non-finite updates until the check (a probe's lr 1e300 member recorded step 2, its run 4)
    (["trainer.check_finite_every_n_steps=5"], "trainer.check_finite_every_n_steps=5 (a population checks every step)"),
    (["logger=mlflow"], "a logger other than TensorBoard or CSV (mlflow)"),
    (["trainer.detect_anomaly=true"], "trainer.detect_anomaly=True"),
    (["test_ckpt=best", "callbacks.model_checkpoint.save_top_k=2"], "test_ckpt=best with callbacks.model_checkpoint"),
    (["optimizer.impl=torch"], "optimizer.impl=torch (member-wise groups are optimlab.optim's)"),  # said once
    (["trainer.precision=bf16-mixed"], "precision"), (["trainer.limit_train_batches=0"], "limit_train_batches=0"),
])
def test_what_a_population_cannot_reproduce_runs_alone(overrides: list[str], reason: str) -> None:
    assert why_alone(compose_config()) is None
    assert why_alone(compose_config("trainer.check_finite_every_n_steps=1")) is None  # null's cadence on the CPU
    assert why_alone(compose_config("model=cnn", "optimizer=adam")) is None
    assert reason in why_alone(compose_config(*overrides))
    if overrides == ["optimizer.impl=torch"]:
        assert why_alone(compose_config(*overrides)) == reason


def test_groups_are_split_evenly_and_a_job_without_partner_runs_alone() -> None:
    def jobs(keys: list[str], seeds: list[int] | None = None, noise: list[float] | None = None) -> list[Job]:
        seeds, noise = seeds or [0] * len(keys), noise or [0.0] * len(keys)
        return [Job(i, [], OmegaConf.create({"data": {"seed": seed, "label_noise": n}}), Path(str(i)), key=key)
                for i, (key, seed, n) in enumerate(zip(keys, seeds, noise))]

    populations = group(jobs(["a"] * 70 + ["b"] + ["c"] * 3), max_members=64)
    assert [len(p) for p in populations] == [35, 35, 3]
    assert [job.num for job in populations[0]] == list(range(35))
    # Members that share their data (seed and label noise) side by side, else in job order.
    mixed = group(jobs(["a"] * 6, seeds=[0, 1, 0, 1, 2, 0], noise=[0, 0, 0.1, 0, 0, 0]), max_members=64)
    assert [job.num for job in mixed[0]] == [0, 5, 2, 1, 3, 4]
    lone = jobs(["a", "b", "a"])
    assert [[job.num for job in p] for p in group(lone, 64)] == [[0, 2]]
    assert lone[1].alone == "a population of one" and lone[1].key is None
    singles = jobs(["a"] * 3)
    assert group(singles, max_members=1) == [] and all(job.alone for job in singles)


def test_groups_are_split_to_fit_the_memory_budget() -> None:
    """A group whose estimated memory exceeds the budget is split evenly into populations that fit;
    one where not even two members fit runs alone, saying why."""
    def jobs(*overrides: str) -> list[Job]:
        cfg = compose_config(*SMALL, *overrides)
        return [Job(i, [], cfg, Path(str(i)), key="k") for i in range(8)]

    need = plan.estimate_memory(compose_config(*SMALL))
    assert need.total(3) < need.total(4) and need.members_within(need.total(3)) == 3
    populations = group(jobs(), max_members=64, budget=lambda cfg: need.total(3))
    assert [len(p) for p in populations] == [3, 3, 2]
    assert [len(p) for p in group(jobs(), max_members=2, budget=lambda cfg: need.total(3))] == [2, 2, 2, 2]
    assert [len(p) for p in group(jobs(), max_members=64, budget=lambda cfg: None)] == [8]
    tight = jobs()
    assert group(tight, max_members=64, budget=lambda cfg: need.total(2) - 1) == []
    assert all(job.key is None and job.alone.startswith(f"two members would need ~{need.total(2) / 2**20:,.0f} MiB, "
                                                        "more than a population's memory budget") for job in tight)
    hopeless = jobs()
    assert group(hopeless, max_members=64, budget=lambda cfg: need.total(1) - 1) == []
    assert all(job.alone.endswith("; even one may not fit") for job in hopeless)
    # With room for many, population.max_members=1 is the reason a job runs alone, not the memory.
    one_each = jobs()
    assert group(one_each, max_members=1, budget=lambda cfg: need.total(3)) == []
    assert all(job.key is None and job.alone == "population.max_members=1" for job in one_each)


def test_memory_estimate_counts_what_the_optimizer_holds() -> None:
    """Per member: weights, gradients, last finite weights, an update temporary and the optimizer's
    tensors; Adam holds two parameter-sized states more than plain SGD, and float64 doubles it all."""
    sgd, adam = (plan.estimate_memory(compose_config(*SMALL, f"optimizer={name}")) for name in ("sgd", "adam"))
    params = (784 * 16 + 16) + (16 * 10 + 10)
    assert sgd.per_member >= 4 * params * 4 and adam.per_member - sgd.per_member >= 2 * params * 4
    wide = plan.estimate_memory(compose_config(*SMALL, "optimizer=adam", "model.hidden=[512]"))
    assert wide.per_member > adam.per_member + 6 * (512 - 16) * 794 * 4 and wide.shared == adam.shared
    double = plan.estimate_memory(compose_config(*SMALL, "optimizer=adam", "trainer.precision=64-true"))
    assert double.per_member > 1.5 * adam.per_member
    tracked = plan.estimate_memory(compose_config(*SMALL, "optimizer=adam", "curvature.every_n_steps=10",
                                                      "curvature.iters=20"))
    assert tracked.per_member >= adam.per_member + (20 + 16) * params * 4  # the Lanczos basis and a product's temporaries
    # A probe is at most the training set (256 images): a larger probe_size had split populations for nothing.
    whole = [plan.estimate_memory(compose_config(*SMALL, "optimizer=adam", "curvature.every_n_steps=10",
                                                 "curvature.iters=20", f"curvature.probe_size={size}")) for size in (256, 10**5)]
    assert whole[0] == whole[1] and whole[0].per_member > adam.per_member
    on_gpu = plan.estimate_memory(compose_config(*SMALL, "trainer.accelerator=gpu"))
    assert on_gpu.per_member - sgd.per_member == params * 4  # the weights a member overflowed into, kept by a where


def test_memory_budget_is_the_knob_or_a_share_of_the_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config(*SMALL)
    monkeypatch.setattr(plan, "device_memory", lambda device: 10 * 2**30)
    assert plan.memory_budget(1.5, None, None)(cfg) == int(1.5 * 2**30)
    here = plan.memory_budget(None, None, None)  # populations one by one in this process
    assert here(cfg) == int(plan.MEMORY_SHARE * 10 * 2**30)
    assert here.plan_lines() == [f"  memory per population on cpu: at most ~{here(cfg) / 2**20:,.0f} MiB "
                                 f"({plan.MEMORY_SHARE:.0%} of the cpu's 10.0 GiB)"]
    local, slurm = (Executor(None, "folder", cluster) for cluster in ("local", "slurm"))
    assert plan.memory_budget(None, local, 4)(cfg) == int(plan.MEMORY_SHARE * 10 * 2**30 / 4)  # 4 at once
    for everywhere, why in ((plan.memory_budget(None, local, None), "submitit_local trains every population at "
                             "once"), (plan.memory_budget(None, slurm, 2), "train on other machines")):
        assert everywhere(cfg) is None and why in everywhere.plan_lines()[0] and "not bounded" in everywhere.plan_lines()[0]
    assert plan.memory_budget(2, slurm, None)(cfg) == 2 * 2**30
    # Forked processes: grouped as in this process (a rerun regroups alike whatever the cores); how many
    # train at once is fits_beside's.
    assert plan.memory_budget(None, Executor(None, "", "processes"), 8)(cfg) == here(cfg)
    monkeypatch.setattr(plan, "device_memory", lambda device: None)
    assert plan.memory_budget(None, None, None)(cfg) is None


def test_forked_populations_start_only_while_they_fit_beside_the_running_ones() -> None:
    def population(members: int, per_member: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(memory=plan.MemoryEstimate(shared=100, per_member=per_member))] * members

    small, large = population(2, 10), population(4, 50)  # 120 and 300 bytes
    assert plan.fits_beside([small], large, 420) and not plan.fits_beside([small], large, 419)
    assert plan.fits_beside([small, small], small, 360) and not plan.fits_beside([small, small, small], small, 479)
    assert plan.fits_beside([large, large], large, None)  # memory unknown: no bound


def test_usable_cpus_are_the_affinity_within_the_containers_quota(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from optimlab.population import cluster

    monkeypatch.setattr(cluster.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(cluster, "CGROUP_CPU_LIMIT", str(limit))
    assert cluster.usable_cpus() == 8  # no such file
    for text, cores in (("max 100000", 8), ("150000 100000", 2), ("50000 100000", 1), ("2000000 100000", 8)):
        limit.write_text(text + "\n")
        assert cluster.usable_cpus() == cores, text


def test_device_memory_is_the_machines_total_within_its_containers_limit(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    found = plan.device_memory(torch.device("cpu"))
    assert found is not None and 2**28 < found < 2**50
    assert plan.device_memory(torch.device("cpu")) == found  # the same figure on every read: a rerun regroups alike
    (tmp_path / "v2").write_text("max\n")  # cgroup v2 without a limit
    (tmp_path / "v1").write_text(f"{2**27}\n")
    monkeypatch.setattr(plan, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "v2"), str(tmp_path / "missing")))
    assert plan.device_memory(torch.device("cpu")) == found
    monkeypatch.setattr(plan, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "v2"), str(tmp_path / "v1")))
    assert plan.device_memory(torch.device("cpu")) == 2**27


# ---------------------------------------------------------------------------- end to end


TINY_DATA = ["data.subset=256", "data.val_size=256", "epochs=2"]
EQUIVALENCE_BUDGET = [*TINY_DATA, "trainer.accelerator=cpu"]
# The equivalence tests run on the CPU and, where there is one, on the GPU. There a single run checks
# for non-finite values every 10 steps by default (no host sync per step); a population checks every
# step, so the GPU runs are asked to check every step too.
ON_GPU = [*TINY_DATA, "trainer.accelerator=gpu", "trainer.check_finite_every_n_steps=1"]
BUDGETS = [pytest.param(EQUIVALENCE_BUDGET, id="cpu"),
           pytest.param(ON_GPU, id="gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def csv_rows(path: Path) -> tuple[list[str], list[list[float | None]]]:
    """A CSV logger's ``metrics.csv``: its header, and its rows with empty cells as None."""
    header, *rows = list(csv.reader(path.open(newline="")))
    return header, [[float(cell) if cell else None for cell in row] for row in rows]


def assert_same_csv_logs(got: Path, expected: Path) -> list[str]:
    """Two CSV loggers' folders hold the same hparams.yaml and metrics.csv: the same columns, the same rows in
    the same order, each with values in the same cells, equal to 1e-9 relative; the columns."""
    (header, rows), (got_header, got_rows) = csv_rows(expected / "metrics.csv"), csv_rows(got / "metrics.csv")
    assert got_header == header and len(got_rows) == len(rows), (got, got_header, header)
    for got_row, row in zip(got_rows, rows):
        assert [v is None for v in got_row] == [v is None for v in row], (got, row)
        values = [v for v in row if v is not None]
        assert [v for v in got_row if v is not None] == pytest.approx(values, rel=1e-9, nan_ok=True), (got, row)
    assert (got / "hparams.yaml").read_text() == (expected / "hparams.yaml").read_text(), got
    return header


def sweep_both_ways(tmp_path: Path, *grid: str) -> tuple[dict[str, dict], dict[str, dict], str]:
    """``grid`` swept by the population launcher and by the basic (sequential) one; each job's
    summary.json by folder, and the population launcher's output."""
    population = train(*grid, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path / 'population'}")
    assert population.returncode == 0, population.stderr[-3000:]
    sequential = train(*grid, f"hydra.sweep.dir={tmp_path / 'sequential'}")
    assert sequential.returncode == 0, sequential.stderr[-3000:]
    pop, seq = summaries(tmp_path / "population"), summaries(tmp_path / "sequential")
    assert pop.keys() == seq.keys()
    return pop, seq, population.stdout


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
def test_a_population_sweep_equals_the_sequential_sweep(mnist_root: Path, tmp_path: Path,
                                                        budget: list[str]) -> None:
    """16 jobs in float64: the four optimizers x lr 0.1 and 1e307 (whose members go non-finite and
    are frozen while the others train on) x two seeds, as four populations, write what the basic launcher's sequential jobs write: the same folders,
    summary.json keys, status, steps, regime, divergence, training, validation and test metrics to
    1e-9 relative (a float64 run also evaluates in float64), per-step scalars to 1e-9; each with TensorBoard events (step and
    epoch scalars, HPARAMS), and
    optimlab-report reads the sweep. Evaluation batches of 3,000 leave the test set a short last one
    (1,000 images), whose loss must count by its size. (Adagrad at lr 0.1 differed by up to 6e-8 while a 64-true run built its
    optimizer before Lightning cast the weights: its accumulator was float32.)"""
    pop, seq, out = sweep_both_ways(tmp_path, "optimizer=sgd,adam,rmsprop,adagrad", "lr=0.1,1e307",
                                    "seed=0,1", "model.hidden=[8]", "trainer.precision=64-true",
                                    "trainer.log_every_n_steps=3", "data.eval_batch_size=3000", *budget)
    assert "16 jobs -> 16 in 4 population(s)" in out
    assert len(seq) == 16
    for name, ref in seq.items():
        got = pop[name]
        assert got.keys() == ref.keys() and got["population"]["members"] == 4 and ref["population"] is None
        for key in ("status", "steps", "regime", "diverged", "diverged_at_step", "divergence_reason", "params",
                    "train_size", "tested_checkpoint", "config"):
            assert got[key] == ref[key], (name, key)
        assert [row.keys() for row in got["epochs"]] == [row.keys() for row in ref["epochs"]]
        for row, ref_row in zip(got["epochs"], ref["epochs"]):
            for key in ("train_loss", "train_acc", "train_loss_max", "train_loss_initial"):
                if key in ref_row:  # null (not finite) in both, or equal to 1e-9
                    expected = ref_row[key] if ref_row[key] is None else pytest.approx(ref_row[key], rel=1e-9)
                    assert row[key] == expected, (name, row["epoch"], key)
            for stage, count in (("val", 256), ("test", 10_000)):
                if ref_row[f"{stage}_loss"] is None:
                    # Weights near 1e307 (lr 1e307): overflowing logits, whose winner rounding decides.
                    assert row[f"{stage}_loss"] is None, (name, stage)
                    continue
                assert round(row[f"{stage}_acc"] * count) == round(ref_row[f"{stage}_acc"] * count), (name, stage)
                assert row[f"{stage}_acc"] == pytest.approx(ref_row[f"{stage}_acc"], rel=1e-9), (name, stage)
                assert row[f"{stage}_loss"] == pytest.approx(ref_row[f"{stage}_loss"], rel=1e-9), (name, stage)
        if ref["epochs"][-1]["test_loss"] is not None:
            assert round(got["test_acc"] * 10_000) == round(ref["test_acc"] * 10_000), name
        assert [row["step"] for row in got["train_steps"]] == [row["step"] for row in ref["train_steps"]], name
        for row, ref_row in zip(got["train_steps"], ref["train_steps"]):
            assert row == {k: v if v is None else pytest.approx(v, rel=1e-9) for k, v in ref_row.items()}, name
    healthy = next(s for s in seq.values() if not s["diverged"])
    assert [row["step"] for row in healthy["train_steps"]] == [0, 3]  # 2 epochs of 2 steps
    diverging = [s for s in seq.values() if s["config"]["lr"] == 1e307]
    assert len(diverging) == 8 and all(s["regime"] == "diverging" and s["diverged"] for s in diverging)
    assert {s["regime"] for s in seq.values() if s["config"]["lr"] < 1} - {"diverging"}
    first = next(iter(pop))
    events = b"".join(p.read_bytes() for p in (tmp_path / "population" / first / "tensorboard").glob("events.*"))
    assert all(tag in events for tag in (b"train/loss", b"train/loss_step", b"train/grad_norm", b"train/weight_norm",
                                         b"train/lr", b"val/acc", b"test/acc", b"_hparams_/experiment", b"regime"))
    assert (tmp_path / "population" / first / ".hydra" / "overrides.yaml").is_file()
    # The same scalars at the same steps (validation at the epoch's last step too, not Lightning's one before).
    healthy_job = next(name for name, s in seq.items() if not s["diverged"])
    scalars = {way: scalar_events(tmp_path / way / healthy_job / "tensorboard") for way in ("population", "sequential")}
    assert scalars["population"].keys() == scalars["sequential"].keys()
    for tag, events in scalars["sequential"].items():
        assert [step for step, _ in scalars["population"][tag]] == [step for step, _ in events], tag
        assert [value for _, value in scalars["population"][tag]] == pytest.approx([v for _, v in events], rel=1e-6), tag
    # Each job's train.log: its epoch lines (a member's: logged when its job finishes) and its result line.
    for name in seq:
        logs = {way: (tmp_path / way / name / "train.log").read_text() for way in ("population", "sequential")}
        epoch_lines = {way: [line.split("] - ", 1)[1].rsplit(" | ", 1)[0] for line in text.splitlines()
                             if "] - epoch " in line] for way, text in logs.items()}
        assert len(epoch_lines["population"]) == len(pop[name]["epochs"]) == len(epoch_lines["sequential"]), name
        if not seq[name]["diverged"]:  # (a diverged member's overflowing logits: see above)
            assert epoch_lines["population"] == epoch_lines["sequential"], name  # float64: the same to 4 decimals
        assert epoch_lines["population"][0].startswith("epoch   1/2 | train loss "), name
        assert f"{pop[name]['description']['optimizer']} lr" in logs["population"] and "| regime: " in logs["population"]
    assert report_main([str(tmp_path / "population")]) == 0
    assert "16 runs" in (tmp_path / "population" / "report.md").read_text()


@pytest.mark.slow
def test_a_scheduled_and_clipped_sweep_as_populations_equals_the_sequential_sweep(mnist_root: Path,
                                                                                 tmp_path: Path) -> None:
    """scheduler=step halving the lr after every epoch and gradients clipped to norm 0.05, SGD and Adam at
    two lrs, float64: two populations whose members each step their own scheduler and clip their own
    gradients write the sequential jobs' records (metrics and the logged gradient norms to 1e-9, the lr of
    every logged step exactly the run's); with callbacks=lr_monitor, its TensorBoard lr at each epoch's start.
    With logger=many and the sharpness tracked every step, each member's CSV logger writes its run's file: the
    same columns and rows in the same order (values to 1e-9) and the same hparams.yaml."""
    pop, seq, out = sweep_both_ways(tmp_path, "optimizer=sgd,adam", "lr=0.05,0.5", "model.hidden=[8]",
                                    "trainer.precision=64-true", "scheduler=step", "scheduler.step_size=1",
                                    "trainer.gradient_clip_val=0.05", "trainer.log_every_n_steps=1",
                                    "callbacks=lr_monitor", "logger=many", "curvature.every_n_steps=1",
                                    "curvature.probe_size=64", "curvature.tol=1e-10", *EQUIVALENCE_BUDGET)
    assert "4 jobs -> 4 in 2 population(s), 0 alone" in out and "adam (StepLR), 2 epochs" in out
    for name, ref in seq.items():
        got, lr = pop[name], ref["config"]["lr"]
        assert [row["lr"] for row in got["train_steps"]] == [row["lr"] for row in ref["train_steps"]] == \
            [lr, lr, lr / 2, lr / 2], name  # 2 epochs of 2 steps
        assert (got["status"], got["regime"]) == (ref["status"], ref["regime"]), name
        norms = [row["grad_norm"] for row in ref["train_steps"]]
        assert [row["grad_norm"] for row in got["train_steps"]] == pytest.approx(norms, rel=1e-9), name
        assert max(norms) <= 0.05, name  # clipped
        for row, ref_row in zip(got["epochs"], ref["epochs"], strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
                assert row[key] == pytest.approx(ref_row[key], rel=1e-9), (name, row["epoch"], key)
        # callbacks=lr_monitor: the lr at each epoch's start, under the run's tag, as its LearningRateMonitor logs it
        tag = f"lr-{'SGD' if 'SGD' in ref['config']['optimizer']['_target_'] else 'Adam'}"
        lrs = {way: scalar_events(tmp_path / way / name / "tensorboard")[tag] for way in ("population", "sequential")}
        assert lrs["population"] == lrs["sequential"] == [(0, pytest.approx(lr)), (2, pytest.approx(lr / 2))], name
        header = assert_same_csv_logs(tmp_path / "population" / name / "csv", tmp_path / "sequential" / name / "csv")
        assert "curvature/sharpness" in header and tag in header, name
        hparams = [(tmp_path / way / name / "tensorboard" / "hparams.yaml").read_text()
                   for way in ("population", "sequential")]
        assert hparams[0] == hparams[1] and "regime: " in hparams[0], name  # a single run's had been {} (a probe)


@pytest.mark.slow
def test_a_member_that_diverges_at_an_epochs_first_step_logs_as_its_run(mnist_root: Path, tmp_path: Path) -> None:
    """One batch an epoch, float64: at lr 1e307 the first update leaves huge weights and the second epoch's first
    loss is not finite, so that epoch ends at the update count the first ended at, after its lr was logged. The
    member's metrics.csv keeps its run's order (epoch 1, the lr of epoch 2, epoch 2)."""
    pop, seq, out = sweep_both_ways(tmp_path, "lr=0.1,1e307", "model.hidden=[8]", "data.subset=128", "epochs=3", "trainer.precision=64-true", "trainer.accelerator=cpu", "logger=csv",
                                    "callbacks=lr_monitor", "trainer.log_every_n_steps=1")
    assert "2 jobs -> 2 in 1 population(s), 0 alone" in out
    diverged = [name for name, s in seq.items() if s["diverged_at_step"] == 1 and len(s["epochs"]) == 2]
    assert len(diverged) == 1, {name: (s["diverged_at_step"], len(s["epochs"])) for name, s in seq.items()}
    for name in seq:
        assert_same_csv_logs(tmp_path / "population" / name / "csv", tmp_path / "sequential" / name / "csv")
    header, rows = csv_rows(tmp_path / "sequential" / diverged[0] / "csv" / "metrics.csv")
    kinds = [[header[i] for i, v in enumerate(row) if v is not None and header[i] != "step"][0] for row in rows]
    # the last: the best epoch's val/acc (the final test was the last epoch's, which its row holds)
    assert kinds == ["lr-SGD", "train/grad_norm", "test/acc", "lr-SGD", "test/acc", "val/acc_best"], kinds


@pytest.mark.slow
def test_members_that_log_differently_share_a_population_and_log_as_their_runs(mnist_root: Path,
                                                                              tmp_path: Path) -> None:
    """Jobs that differ only in their loggers and learning-rate monitor train as one population (a probe: they
    were split, one population each), and each member's logs are its own run's."""
    pop, seq, out = sweep_both_ways(tmp_path, "logger=csv,many", "callbacks=default,lr_monitor", "model.hidden=[8]",
                                    "trainer.precision=64-true", "trainer.log_every_n_steps=1", *EQUIVALENCE_BUDGET)
    assert "4 jobs -> 4 in 1 population(s), 0 alone" in out
    for name, s in seq.items():
        header = assert_same_csv_logs(tmp_path / "population" / name / "csv", tmp_path / "sequential" / name / "csv")
        assert ("lr-SGD" in header) == ("lr_monitor" in s["config"]["callbacks"]), name
        assert (tmp_path / "population" / name / "tensorboard").is_dir() == ("tensorboard" in s["config"]["logger"])
        for got, row in zip(pop[name]["epochs"], seq[name]["epochs"], strict=True):
            assert {**got, "train_time_s": 0} == pytest.approx({**row, "train_time_s": 0}, rel=1e-9), name


@pytest.mark.slow
def test_a_sweep_without_a_logger_trains_as_a_population_and_writes_no_logs(mnist_root: Path, tmp_path: Path) -> None:
    result = train("lr=0.05,0.5", "model.hidden=[8]", "logger=none", *EQUIVALENCE_BUDGET, "hydra/launcher=population",
                   f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 jobs -> 2 in 1 population(s), 0 alone" in result.stdout
    for job in (tmp_path / name for name in summaries(tmp_path)):
        assert json.loads((job / "summary.json").read_text())["status"] == "complete"
        assert sorted(p.name for p in job.iterdir()) == [".hydra", "summary.json", "train.log"], job


@pytest.mark.slow
def test_a_dropout_and_gradient_noise_sweep_as_populations_equals_the_sequential_sweep(mnist_root: Path,
                                                                                     tmp_path: Path) -> None:
    """model.dropout=0.3 and optimizer.grad_noise_std=0.05, SGD and Adam at two lrs and two seeds, float64: each
    member draws its masks and noise from its own generator, in the state its run's training starts from, and
    evaluates without dropout: the sequential jobs' records (every step's loss and gradient norm, the epochs'
    metrics to 1e-9)."""
    pop, seq, out = sweep_both_ways(tmp_path, "optimizer=sgd,adam", "lr=0.05,0.5", "seed=0,1", "model.hidden=[16]",
                                    "model.dropout=0.3", "optimizer.grad_noise_std=0.05", "trainer.precision=64-true",
                                    "trainer.log_every_n_steps=1", *EQUIVALENCE_BUDGET)
    assert "8 jobs -> 8 in 2 population(s), 0 alone" in out
    for name, ref in seq.items():
        got = pop[name]
        assert (got["status"], got["regime"], got["steps"]) == (ref["status"], ref["regime"], ref["steps"]), name
        for key in ("loss", "grad_norm", "weight_norm"):
            expected = [row[key] for row in ref["train_steps"]]
            assert [row[key] for row in got["train_steps"]] == pytest.approx(expected, rel=1e-9), (name, key)
        for row, ref_row in zip(got["epochs"], ref["epochs"], strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
                assert row[key] == pytest.approx(ref_row[key], rel=1e-9), (name, row["epoch"], key)


@pytest.mark.slow
def test_a_best_checkpoint_sweep_as_populations_equals_the_sequential_sweep(mnist_root: Path, tmp_path: Path) -> None:
    """test_ckpt=best (the default model_checkpoint: val/loss, min), SGD with weight decay at three lrs and two
    seeds, float64: each member is tested with the weights of the epoch its run's ModelCheckpoint kept (a best
    epoch before the last at lr 3), or with its last weights where its run's every save was refused for
    non-finite weights (lr 1e300): the sequential jobs' tested checkpoints and test metrics (1e-9)."""
    pop, seq, out = sweep_both_ways(tmp_path, "optimizer=sgd", "lr=0.3,3,1e300", "seed=0,1", "model.hidden=[16]",
                                    "optimizer.weight_decay=0.1", "test_ckpt=best", "trainer.precision=64-true",
                                    "data.subset=256", "data.val_size=256", "epochs=3", "trainer.accelerator=cpu",
                                    "callbacks=lr_monitor")
    assert "6 jobs -> 6 in 1 population(s), 0 alone" in out
    for name, ref in seq.items():
        got = pop[name]
        assert (got["status"], got["tested_checkpoint"]) == (ref["status"], ref["tested_checkpoint"]), name
        for key in ("test_loss", "test_acc"):  # null: NaN (a diverged member's)
            assert got[key] == (ref[key] if ref[key] is None else pytest.approx(ref[key], rel=1e-9)), (name, key)
        # callbacks=lr_monitor without a scheduler: the lr at each epoch's start (one epoch for a diverged run)
        lrs = {way: scalar_events(tmp_path / way / name / "tensorboard")["lr-SGD"] for way in ("population", "sequential")}
        lr = float(torch.tensor(ref["config"]["lr"], dtype=torch.float32))  # as TensorBoard keeps it (1e300: inf)
        assert lrs["population"] == lrs["sequential"] == [(2 * e, lr) for e in range(len(ref["epochs"]))], name
    tested = {(s["config"]["lr"], s["tested_checkpoint"], s["test_acc"] == s["epochs"][-1]["test_acc"])
              for s in seq.values()}
    assert (3, "best", False) in tested and (1e300, "last", True) in tested  # an earlier epoch's; a refused save's


@pytest.mark.slow
def test_an_early_stopping_sweep_as_populations_equals_the_sequential_sweep(mnist_root: Path, tmp_path: Path) -> None:
    """callbacks=early_stopping (val/loss, patience 0 and 2: members of one population with rules of their own)
    over 5 epochs, SGD and Adam at two lrs, float64: each member stops where its run stops (the same epochs, some
    fewer than 5), with its run's records (1e-9)."""
    pop, seq, out = sweep_both_ways(tmp_path, "optimizer=sgd,adam", "lr=0.3,3", "model.hidden=[8]",
                                    "trainer.precision=64-true", "callbacks=early_stopping",
                                    "callbacks.early_stopping.patience=0,2", "data.subset=256", "data.val_size=256",
                                    "epochs=5", "trainer.accelerator=cpu")
    assert "8 jobs -> 8 in 2 population(s), 0 alone" in out
    assert {len(s["epochs"]) for s in seq.values()} - {5}  # some stopped early
    for name, ref in seq.items():
        got = pop[name]
        assert (got["status"], got["regime"], len(got["epochs"])) == (ref["status"], ref["regime"], len(ref["epochs"])), name
        for row, ref_row in zip(got["epochs"], ref["epochs"], strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
                assert row[key] == pytest.approx(ref_row[key], rel=1e-9), (name, row["epoch"], key)
        assert got["test_acc"] == pytest.approx(ref["test_acc"], rel=1e-9), name


@pytest.mark.slow
def test_a_member_updated_into_non_finite_weights_is_evaluated_as_its_run(mnist_root: Path, tmp_path: Path) -> None:
    """lr 1e200 with weight decay: the second update overflows the weights while loss and gradients are
    finite. Its run keeps (and validates, and tests) those weights; the member is frozen at its last
    finite ones but evaluated on the run's: the diverged epoch's validation and the test were the last
    finite weights' (val acc 0.02 against the run's 0.085 in a reviewer's float32 sweep). Each job's
    .hydra/config.yaml is its run's too (a member's kept trainer.max_epochs: ${epochs})."""
    pop, seq, _ = sweep_both_ways(tmp_path, "lr=0.1,1e200", "optimizer.weight_decay=0.1", "model.hidden=[8]",
                                  "trainer.precision=64-true", *EQUIVALENCE_BUDGET)
    overflowed = [name for name, s in seq.items() if s["divergence_reason"] == "non-finite weights after the update"]
    assert len(overflowed) == 1
    for name, ref in seq.items():
        got = pop[name]
        assert (got["status"], got["diverged_at_step"], got["divergence_reason"]) == \
            (ref["status"], ref["diverged_at_step"], ref["divergence_reason"])
        for key in ("test_acc", "test_loss"):
            assert got[key] == (None if ref[key] is None else pytest.approx(ref[key], rel=1e-9)), (name, key)
        for row, ref_row in zip(got["epochs"], ref["epochs"]):
            for key in ("val_loss", "val_acc"):
                assert row[key] == (None if ref_row[key] is None else pytest.approx(ref_row[key], rel=1e-9)), (name, key)
        assert (tmp_path / "population" / name / ".hydra" / "config.yaml").read_text() == \
            (tmp_path / "sequential" / name / ".hydra" / "config.yaml").read_text()
    assert seq[overflowed[0]]["epochs"][-1]["val_loss"] is None  # NaN logits, as its run measured them


@pytest.mark.slow
def test_trainer_max_epochs_sets_a_populations_epochs_as_it_sets_a_runs(mnist_root: Path, tmp_path: Path) -> None:
    """trainer.max_epochs=2 without epochs= is one setting with epochs (its runs train 2): its jobs share a
    population (they had run alone), with the records and .hydra/ configs of the sequential sweep."""
    grid = ["lr=0.1,0.5", "trainer.max_epochs=2", "data.subset=256", "data.val_size=500", "model.hidden=[16]",
            "trainer.accelerator=cpu", "trainer.num_threads=1"]
    pop, seq, out = sweep_both_ways(tmp_path, *grid)
    assert "2 jobs -> 2 in 1 population(s), 0 alone" in out
    for name, ref in seq.items():
        assert len(ref["epochs"]) == 2 and ref["config"]["epochs"] == 2
        assert pop[name]["config"] == ref["config"] and len(pop[name]["epochs"]) == 2
        for got, row in zip(pop[name]["epochs"], ref["epochs"]):  # float32: the metrics' accumulation differs
            assert {**got, "train_time_s": 0} == pytest.approx({**row, "train_time_s": 0}, rel=1e-6)
        assert (tmp_path / "population" / name / ".hydra" / "config.yaml").read_text() == \
            (tmp_path / "sequential" / name / ".hydra" / "config.yaml").read_text()
    contradicting = train(*grid, "epochs=3", "hydra/launcher=population", f"hydra.sweep.dir={tmp_path / 'both'}")
    assert contradicting.returncode == 1 and "trainer.max_epochs: 2 contradicts epochs: 3" in contradicting.stderr


@pytest.mark.slow
def test_an_update_coefficient_beyond_float32_diverges_a_run_and_a_member_alike(mnist_root: Path,
                                                                               tmp_path: Path) -> None:
    """Adam at lr 3e38 in float32: lr / (1 - beta1) does not fit float32. Its run crashed (torch refuses
    the conversion) where its member diverged; first in the grid, the plan's memory estimate crashed the
    sweep. Now both diverge at step 1 on non-finite weights, and the other job trains; the diverging step
    counts, and its logged row, in both (the run's optimizer had refused it: 0 steps, no row; a probe)."""
    pop, seq, _ = sweep_both_ways(tmp_path, "optimizer=adam", "lr=3e38,0.01", *SMALL)
    for name, ref in seq.items():
        got = pop[name]
        fields = ("status", "regime", "diverged_at_step", "divergence_reason", "test_acc", "steps")
        assert [got[k] for k in fields] == [ref[k] for k in fields], name
        assert [row["val_acc"] for row in got["epochs"]] == [row["val_acc"] for row in ref["epochs"]]
        assert [row["step"] for row in got["train_steps"]] == [row["step"] for row in ref["train_steps"]], name
    assert sorted(s["status"] for s in seq.values()) == ["complete", "diverged"]
    assert next(s for s in seq.values() if s["status"] == "diverged")["diverged_at_step"] == 1
    # An lr float32 cannot hold is refused, also in a job whose check another job's stands for.
    beyond = train("lr=0.1,1e39", *SMALL, "hydra/launcher=population", "population.dry_run=true",
                   f"hydra.sweep.dir={tmp_path / 'beyond'}")
    assert beyond.returncode == 1 and "job #1 invalid: lr: 1e+39 is not allowed" in beyond.stdout


@pytest.mark.slow
def test_a_population_limits_its_epochs_as_lightning_limits_a_run(mnist_root: Path, tmp_path: Path) -> None:
    """``trainer.limit_train_batches`` as a count (3 of 8 batches) and as a fraction (0.5: 4 of 8):
    each member trains the first batches of its own run's order of each epoch, no more, as its
    sequential run does (float64: training losses to 1e-9 relative). ``limit_val_batches=2`` (of 3
    validation chunks of 100, and of an epoch's test) and ``limit_test_batches=0.3`` (30 of 100 test
    chunks): its validation and test metrics on those, as its run's."""
    pop, seq, out = sweep_both_ways(tmp_path, "lr=0.05,0.2", "seed=0,1", "trainer.limit_train_batches=3,0.5",
                                    "batch_size=32", "model.hidden=[8]", "trainer.precision=64-true",
                                    "trainer.limit_val_batches=2", "trainer.limit_test_batches=0.3",
                                    "data.eval_batch_size=100", *EQUIVALENCE_BUDGET)
    assert "8 jobs -> 8 in 2 population(s)" in out
    for name, ref in seq.items():
        got = pop[name]
        limit = ref["config"]["trainer"]["limit_train_batches"]
        assert got["steps"] == ref["steps"] == 2 * (3 if limit == 3 else 4), name
        assert got["regime"] == ref["regime"], name
        for row, ref_row in zip(got["epochs"], ref["epochs"], strict=True):
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
                assert row[key] == pytest.approx(ref_row[key], rel=1e-9), (name, key)
            assert ref_row["val_acc"] * 200 == pytest.approx(round(ref_row["val_acc"] * 200)), name  # on 200 images
        assert got["test_acc"] == pytest.approx(ref["test_acc"], rel=1e-9), name
        assert ref["test_acc"] * 3000 == pytest.approx(round(ref["test_acc"] * 3000)), name  # on 3,000 images


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
def test_a_float32_population_sweep_ends_where_the_sequential_one_does(mnist_root: Path, tmp_path: Path,
                                                                       budget: list[str]) -> None:
    """16 jobs in float32 (the four optimizers x lr 0.001 and 1.0 x widths 8 and 24): the same
    regimes, and final test accuracies within 0.3 points (the issue's bar). With one thread on the
    CPU the members train bitwise as their runs (MemberLinear), so every epoch's training,
    validation and test counts are equal and only the metrics' float32 accumulation differs."""
    on_cpu = "trainer.accelerator=cpu" in budget
    pop, seq, _ = sweep_both_ways(tmp_path, "optimizer=sgd,adam,rmsprop,adagrad", "lr=0.001,1.0",
                                  "model.hidden=[8],[24]", *budget, *(["trainer.num_threads=1"] if on_cpu else []))
    assert len(seq) == 16
    for name, ref in seq.items():
        assert pop[name]["regime"] == ref["regime"] and pop[name]["steps"] == ref["steps"], name
        assert abs(pop[name]["test_acc"] - ref["test_acc"]) <= 0.003, name
        if not on_cpu:
            continue
        for row, ref_row in zip(pop[name]["epochs"], ref["epochs"]):
            for key, count in (("train_acc", 256), ("val_acc", 256), ("test_acc", 10_000)):
                if ref_row.get(key) is not None:
                    assert round(row[key] * count) == round(ref_row[key] * count), (name, row["epoch"], key)
            for key in ("train_loss", "val_loss", "test_loss"):
                if ref_row.get(key) is not None:
                    assert row[key] == pytest.approx(ref_row[key], rel=1e-6), (name, row["epoch"], key)


@pytest.mark.slow
@pytest.mark.parametrize("budget", BUDGETS)
def test_a_tracked_population_records_the_sharpness_its_runs_record(mnist_root: Path, tmp_path: Path,
                                                                    budget: list[str]) -> None:
    """``curvature.every_n_steps`` in a population (two of two members each, SGD and Adam; float64):
    every member's sharpness record (each measurement, its step, threshold and crossing; the epoch
    rows' sharpness keys) is its sequential run's, the values to 1e-9 relative (one batched
    Hessian-vector product per Lanczos step against each run's own); the diagnosis is the same, and
    the member's TensorBoard events hold the series, and optimlab-report draws it from the record."""
    pop, seq, out = sweep_both_ways(tmp_path, "optimizer=sgd,adam", "lr=0.5", "seed=0,1",
                                    "model.hidden=[16]", "trainer.precision=64-true", "curvature.every_n_steps=2",
                                    "curvature.log_spaced_start=true", "curvature.probe_size=64",
                                    *budget)
    assert "4 jobs -> 4 in 2 population(s)" in out
    for name, ref in seq.items():
        got, expected = pop[name]["curvature"], ref["curvature"]
        assert expected["measurements"] >= 3 and got.keys() == expected.keys(), name
        for key, value in expected.items():
            if key == "series":
                assert [row[0] for row in got[key]] == [row[0] for row in value], name
                assert [row[1:] for row in got[key]] == [pytest.approx(row[1:], rel=1e-9) for row in value], name
            elif isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9), (name, key)
            else:
                assert got[key] == value, (name, key)
        for row, ref_row in zip(pop[name]["epochs"], ref["epochs"], strict=True):
            assert row.keys() == ref_row.keys() and row["sharpness_crossed_at_step"] == ref_row["sharpness_crossed_at_step"]
            assert row["sharpness_max"] == pytest.approx(ref_row["sharpness_max"], rel=1e-9)
        assert pop[name]["regime"] == ref["regime"] and pop[name]["regime_evidence"] == ref["regime_evidence"]
    assert {s["curvature"]["preconditioned"] for s in pop.values()} == {True, False}
    assert any(s["curvature"]["first_crossing_step"] is not None for s in pop.values())
    first = next(iter(pop))
    events = b"".join(p.read_bytes() for p in (tmp_path / "population" / first / "tensorboard").glob("events.*"))
    assert b"curvature/sharpness" in events and b"curvature/threshold" in events
    assert report_main([str(tmp_path / "population")]) == 0
    assert (tmp_path / "population" / "sharpness.png").is_file()


def test_auto_forks_where_several_cores_are_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    from optimlab.population import cluster

    for cores, forks, expected in ((2, True, "processes"), (1, True, "inline"), (8, False, "inline")):
        monkeypatch.setattr(cluster, "usable_cpus", lambda: cores)
        monkeypatch.setattr(cluster, "can_fork", lambda: forks)
        assert cluster.default_executor() == expected, (cores, forks)


def test_a_population_wanting_threads_or_a_gpu_trains_in_the_launching_process() -> None:
    """A forked child trains with one thread on the CPU: a population set to more threads, or on a
    GPU, is not forked."""
    def members(*overrides: str) -> list[SimpleNamespace]:
        return [SimpleNamespace(plain=compose_config(*overrides))]  # what forkable reads of a Job

    assert launcher.forkable(members("trainer.accelerator=cpu"))
    assert launcher.forkable(members("trainer.accelerator=cpu", "trainer.num_threads=1"))
    assert not launcher.forkable(members("trainer.accelerator=cpu", "trainer.num_threads=2"))
    if torch.cuda.is_available():
        assert not launcher.forkable(members("trainer.accelerator=gpu"))


def test_local_jobs_see_this_machines_gpus_unless_told() -> None:
    """submitit's local executor hides the GPUs from a job that does not ask for them: ours ask for
    all of this machine's, unless ``gpus_per_node`` is given; SLURM's parameters stay as given."""
    from optimlab.population.cluster import executor_parameters

    assert executor_parameters("submitit_local", {"timeout_min": 60}, 2) == {"timeout_min": 60, "gpus_per_node": 2}
    assert executor_parameters("submitit_local", {"timeout_min": 60}, 0) == {"timeout_min": 60, "gpus_per_node": 0}
    assert executor_parameters("submitit_local", {"gpus_per_node": 1}, 2) == {"gpus_per_node": 1}
    assert executor_parameters("submitit_slurm", {"timeout_min": 60}, 2) == {"timeout_min": 60}


def test_a_population_checkpoint_loads_only_for_its_jobs_configs_and_format(tmp_path: Path) -> None:
    """resume=auto continues only from this population's file, in this version's format (an older
    format holds its linear weights transposed), and says why it starts over otherwise."""
    from optimlab.population.checkpoint import FORMAT, PopulationCheckpoint

    dirs = [tmp_path / "0_lr=0.1", tmp_path / "1_lr=1"]
    configs = [{"lr": 0.1, "resume": "auto"}, {"lr": 1.0, "resume": None}]
    checkpoint = PopulationCheckpoint(dirs, configs)
    assert checkpoint.load(torch.device("cpu")) == (None, "no checkpoint")
    checkpoint.save({"weights": torch.ones(2)}, wall_time_s=3.0)
    plan = {"population": {"max_members": 100, "dry_run": False}}  # another plan that formed the same population
    state, why = PopulationCheckpoint(dirs, [{"lr": 0.1, **plan}, {"lr": 1.0, "epochs": 9}]).load(torch.device("cpu"))
    assert why == "" and state["wall_time_s"] == 3.0 and torch.equal(state["loop"]["weights"], torch.ones(2))
    other_configs = PopulationCheckpoint(dirs, [{"lr": 0.1}, {"lr": 2.0}])
    assert "other configs" in other_configs.load(torch.device("cpu"))[1]
    torch.save({**torch.load(checkpoint.path), "format": FORMAT - 1}, checkpoint.path)
    state, why = checkpoint.load(torch.device("cpu"))
    assert state is None and f"has format {FORMAT - 1}; this version reads format {FORMAT}" in why
    torch.save({**torch.load(checkpoint.path), "jobs": ["0_lr=0.1", "2_lr=3"]}, checkpoint.path)
    assert "is not this population's checkpoint" in checkpoint.load(torch.device("cpu"))[1]


def test_executor_tidy_removes_only_an_empty_template_folder(tmp_path: Path) -> None:
    from optimlab.population.cluster import Executor

    template = tmp_path / ".submitit" / "%j"
    template.mkdir(parents=True)
    Executor(None, str(template), "local").tidy()
    assert not template.exists() and template.parent.is_dir()
    template.mkdir()
    (template / "log").write_text("kept")
    Executor(None, str(template), "local").tidy()
    assert (template / "log").is_file()
    plain = tmp_path / "plain"
    plain.mkdir()
    Executor(None, str(plain), "local").tidy()
    assert plain.is_dir()


@pytest.mark.slow
def test_populations_run_as_submitit_jobs(mnist_root: Path, tmp_path: Path) -> None:
    """``hydra.launcher.executor=submitit_local``: each population (here two: widths 8 and 16) is
    one submitit job, a process of its own, one at a time; every member's record is the one the
    populations trained in this process write, and each job's folder is complete."""
    grid = ["lr=0.05,0.1", "model.hidden=[8],[16]", "trainer.precision=64-true", *EQUIVALENCE_BUDGET]
    inline = train(*grid, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path / 'inline'}")
    assert inline.returncode == 0, inline.stderr[-3000:]
    submitted = train(*grid, "hydra/launcher=population", "hydra.launcher.executor=submitit_local",
                      "hydra.launcher.max_parallel=1", f"hydra.sweep.dir={tmp_path / 'submitit'}")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert submitted.stdout.count("submitted as submitit job") == 2
    logs = sorted((tmp_path / "submitit" / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("epoch   2/2" in log.read_text() for log in logs)
    assert not (tmp_path / "submitit" / ".submitit" / "%j").exists()  # submitit's local jobs make it; removed
    got, ref = summaries(tmp_path / "submitit"), summaries(tmp_path / "inline")
    assert len(ref) == 4 and got.keys() == ref.keys()
    for name, expected in ref.items():
        assert got[name]["status"] == "complete" and got[name]["population"]["members"] == 2
        for key in ("steps", "regime", "test_acc", "test_loss"):
            assert got[name][key] == expected[key], (name, key)
        for row, ref_row in zip(got[name]["epochs"], expected["epochs"], strict=True):
            assert row["train_loss"] == pytest.approx(ref_row["train_loss"], rel=1e-12)
            assert row["val_acc"] == ref_row["val_acc"]
        assert (tmp_path / "submitit" / name / ".hydra" / "overrides.yaml").is_file()
        assert list((tmp_path / "submitit" / name / "tensorboard").glob("events.out.tfevents.*"))


def test_missing_mnist_files_are_looked_for_once_per_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job of a sweep whose data root lacks the files fails with the data module's one-line
    error, but the files are checked (and their download tried) once, not once per job."""
    from optimlab.mnist_files import DataError, ensure_files

    calls = []
    monkeypatch.setattr(plan, "ensure_files", lambda root, download: calls.append(root) or ensure_files(root, False))
    jobs = [compose_config(f"lr={lr}", f"data.root={tmp_path}", "trainer.accelerator=cpu") for lr in (0.1, 0.2, 0.3)]
    errors = []
    for cfg in jobs:
        with pytest.raises(DataError, match="^data.root: MNIST files missing from") as err:
            plan.check(cfg)
        errors.append(str(err.value))
    assert calls == [tmp_path] and errors == errors[:1] * 3 and str(tmp_path) in errors[0]


def test_a_broken_test_split_fails_the_check_as_the_runs_data_setup_does(tmp_path: Path) -> None:
    """The check loads the test split too (once per root, so that forked populations share it): a test
    label file with a label outside 0..9 fails each job with the data module's own error, before training."""
    from conftest import write_idx
    from optimlab.data import MNISTDataModule
    from optimlab.mnist_files import DataError

    root = write_idx(tmp_path / "broken")
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + b"\x0c")
    with pytest.raises(DataError) as expected:
        MNISTDataModule(root=str(root), val_size=16, download=False).setup()
    for lr in (0.1, 0.2):
        with pytest.raises(DataError) as err:
            plan.check(compose_config(f"lr={lr}", f"data.root={root}", "data.val_size=16", "trainer.accelerator=cpu"))
        assert str(err.value) == str(expected.value) and "test split" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name", ["population", "basic"])
def test_an_invalid_job_fails_alone(mnist_root: Path, tmp_path: Path, launcher_name: str) -> None:
    """lr=-1 fails its two jobs with the one-line ConfigError (recorded as crashed for the report, exit
    code 1), with either launcher; the two valid jobs still train (as one population)."""
    result = train("lr=0.1,-1", "seed=0,1", *SMALL, f"hydra/launcher={launcher_name}", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1
    assert "error: lr: -1 is not allowed; expected a positive number" in result.stderr
    assert "Traceback" not in result.stderr and "\nlr: -1 is not allowed; expected a positive number\n" in result.stderr
    runs = summaries(tmp_path)
    statuses = {name.split("_", 1)[0]: s["status"] for name, s in runs.items()}
    assert statuses == {"0": "complete", "1": "complete", "2": "crashed", "3": "crashed"}
    for name, s in runs.items():
        if s["status"] == "crashed":
            assert s["error"] == "ConfigError: lr: -1 is not allowed; expected a positive number"
            assert s["population"] is None
            recorded = yaml.safe_load((tmp_path / name / ".hydra" / "config.yaml").read_text())
            assert recorded["trainer"]["max_epochs"] == recorded["epochs"]  # as a run records it (not ${epochs})
        else:
            assert 0 <= s["test_acc"] <= 1
            assert (s["population"] or {}).get("members") == (2 if launcher_name == "population" else None)


@pytest.mark.slow
def test_jobs_that_share_a_folder_do_not_share_a_record(mnist_root: Path, tmp_path: Path) -> None:
    """A hydra.sweep.subdir that does not tell the jobs apart: the second job fails in one line and the
    folder keeps the first job's record (both members trained into it before, the second's record kept)."""
    result = train("lr=0.1,0.2", *SMALL, "hydra/launcher=population", "hydra.launcher.executor=inline",
                   "hydra.sweep.subdir=same", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1
    assert f"error: {tmp_path / 'same'} is also job #0's folder; give each job its own (hydra.sweep.subdir)" \
        in result.stderr
    saved = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert saved["status"] == "complete" and saved["config"]["lr"] == 0.1


def test_jobs_that_would_write_one_file_outside_their_folders_are_planned_apart(tmp_path: Path) -> None:
    """Members sharing a CSV save_dir had written one metrics.csv, the last member's (a review): the second
    job is refused in the plan, before any member trains."""
    result = train("lr=0.1,0.2", *SMALL, "hydra/launcher=population", "population.dry_run=true", "logger=csv",
                   f"+logger.csv.save_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert f"job #1 invalid: logger.csv.save_dir: job #0 writes {tmp_path / 'logs' / 'metrics.csv'} too, which one of " \
        "them would replace; give each job its own folder or another logger.csv.version" in result.stdout
    assert not (tmp_path / "logs").exists()
    # under resume=auto too, a new member does not replace another run's file (a review: it had been unchecked)
    (tmp_path / "logs" / "version_0").mkdir(parents=True)
    (tmp_path / "logs" / "version_0" / "metrics.csv").write_text("step\n")
    result = train("seed=0,1", *SMALL, "hydra/launcher=population", "population.dry_run=true", "logger=csv",
                   f"+logger.csv.save_dir={tmp_path / 'logs'}", "logger.csv.version=${seed}", "resume=auto",
                   f"hydra.sweep.dir={tmp_path / 'sweep2'}")
    assert f"job #0 invalid: logger.csv.save_dir: '{tmp_path / 'logs'}' holds another run's " in result.stdout
    assert "job #1 invalid" not in result.stdout


@pytest.mark.slow
def test_values_that_interpolate_the_jobs_hydra_config_are_each_jobs_own(mnist_root: Path, tmp_path: Path) -> None:
    """name and seed interpolating ${hydra:runtime.output_dir} and ${hydra:job.num} resolve in each job's
    Hydra context, as the basic launcher resolves them (before, the launcher resolved them outside any job
    and stopped with a traceback): the jobs share one population, each with its own seed and name, and
    each record is the sequential job's."""
    swept = ["lr=0.1,0.2", "name=${hydra:runtime.output_dir}", "seed=${hydra:job.num}", *SMALL]
    for launcher_name in ("population", "basic"):
        result = train(*swept, f"hydra/launcher={launcher_name}", f"hydra.sweep.dir={tmp_path / launcher_name}",
                       "trainer.num_threads=1")
        assert result.returncode == 0, result.stderr[-2000:]
    population, basic = summaries(tmp_path / "population"), summaries(tmp_path / "basic")
    assert sorted(population) == sorted(basic)
    for name, s in population.items():
        num = int(name.split("_", 1)[0])
        assert (s["config"]["name"], basic[name]["config"]["name"]) == (str(tmp_path / "population" / name),
                                                                         str(tmp_path / "basic" / name))
        assert (s["config"]["seed"], s["population"]["members"]) == (num, 2)
        assert {**s["config"], "name": None} == {**basic[name]["config"], "name": None}
        assert [row["val_acc"] for row in s["epochs"]] == [row["val_acc"] for row in basic[name]["epochs"]]
        assert s["test_acc"] == basic[name]["test_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("knobs", ["population", "hydra.launcher"])
def test_dry_run_prints_the_plan_and_writes_nothing(mnist_root: Path, tmp_path: Path, knobs: str) -> None:
    result = train("lr=0.1,0.5", "seed=0,1,2", "trainer.detect_anomaly=false,true", *SMALL,
                   "hydra/launcher=population",
                   f"{knobs}.dry_run=true", f"{knobs}.max_members=2", f"hydra.sweep.dir={tmp_path / 'new' / 'sweep'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "new").exists()  # the folders it made, with Hydra's multirun.yaml, are gone again
    out = result.stdout
    assert "12 jobs -> 6 in 3 population(s), 6 alone, 0 invalid" in out
    assert "population 1: 2 members" in out and "MiB" in out and "alone: trainer.detect_anomaly=True" in out
    assert "memory per population on cpu: at most ~" in out
    assert not list(tmp_path.rglob("summary.json")) and not list(tmp_path.rglob(".hydra"))
    # A folder that was there stays, with an earlier sweep's multirun.yaml as it was (a probe: Hydra's sweeper had
    # replaced it, and the report named the dry run's command), or none where it had none.
    earlier = "an earlier sweep's record\n"
    (tmp_path / "multirun.yaml").write_text(earlier)
    (tmp_path / "other").mkdir()
    again = train("lr=0.1", *SMALL, "hydra/launcher=population", f"{knobs}.dry_run=true",
                  f"hydra.sweep.dir={tmp_path / 'other'}")
    assert again.returncode == 0 and not list((tmp_path / "other").iterdir())
    # Under submitit too (a probe: its executor, made before the plan, had left .submitit/ in the sweep's folder).
    submitted = train("lr=0.1", *SMALL, "hydra/launcher=population", f"{knobs}.dry_run=true",
                      "hydra.launcher.executor=submitit_local", f"hydra.sweep.dir={tmp_path / 'new' / 'sweep'}")
    assert submitted.returncode == 0 and not (tmp_path / "new").exists(), submitted.stderr[-3000:]
    # Populations alike but for a setting: each line names its own.
    twins = train("lr=0.1,0.5", "curvature.every_n_steps=5", "curvature.probe_size=32,64", *SMALL,
                  "hydra/launcher=population", f"{knobs}.dry_run=true", f"hydra.sweep.dir={tmp_path}")
    assert twins.returncode == 0, twins.stderr[-3000:]
    assert (tmp_path / "multirun.yaml").read_text() == earlier
    lines = [line for line in twins.stdout.splitlines() if " members (jobs " in line]
    assert [line.split("seed 0; ")[1].split(";")[0] for line in lines] == ["curvature.probe_size=32",
                                                                          "curvature.probe_size=64"]
    # The member-wise values the members differ in, each named (a probe: only lr and seed were).
    wise = train("lr=0.1", "optimizer.weight_decay=0,0.001", "data.seed=3,4", *SMALL, "hydra/launcher=population",
                 f"{knobs}.dry_run=true", f"hydra.sweep.dir={tmp_path}")
    assert "lr 0.1; seed 0; optimizer.weight_decay 0, 0.001; data.seed 3, 4; ~" in wise.stdout, wise.stdout[-2000:]
    # A hydra override interpolating the job's Hydra config is planned as the basic launcher runs it (a probe:
    # the plan had resolved it outside any job, a traceback).
    numbered = train("lr=0.1,0.5", *SMALL, "hydra/launcher=population", f"{knobs}.dry_run=true",
                     f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=job${hydra.job.num}")
    assert numbered.returncode == 0, numbered.stderr[-3000:]
    assert "2 jobs -> 2 in 1 population(s)" in numbered.stdout
    # A budget too small for two members: the plan says so and runs each job alone.
    small = train("lr=0.1,0.5", *SMALL, "hydra/launcher=population", f"{knobs}.dry_run=true",
                  f"{knobs}.max_memory_gib=0.01", f"hydra.sweep.dir={tmp_path}")
    assert small.returncode == 0, small.stderr[-3000:]
    assert "2 jobs -> 0 in 0 population(s), 2 alone" in small.stdout
    assert "memory per population on cpu: at most ~10 MiB (population.max_memory_gib)" in small.stdout
    assert "jobs #0, #1 alone: two members would need ~" in small.stdout  # one line for the jobs of one reason
    # An invalid job: planned as invalid, and the dry run exits as the sweep would (1), naming it.
    invalid = train("lr=-1,0.1", *SMALL, "hydra/launcher=population", f"{knobs}.dry_run=true", f"hydra.sweep.dir={tmp_path}")
    assert invalid.returncode == 1 and "job #0 invalid: lr: -1 is not allowed" in invalid.stdout
    assert "lr: -1 is not allowed; expected a positive number" in invalid.stderr
    # Jobs invalid for one reason (a sweep without its MNIST files: one line per job of 144): one plan line.
    same = train("lr=0.1,0.5,1", *SMALL, "hydra/launcher=population", f"{knobs}.dry_run=true", "optimizer.eps=0",
                 "optimizer=adam", f"hydra.sweep.dir={tmp_path}")
    assert same.returncode == 1 and same.stdout.count(" invalid: optimizer.eps: 0 is not allowed") == 1
    assert "jobs #0, #1, #2 invalid: optimizer.eps: 0 is not allowed" in same.stdout
    assert not list(tmp_path.rglob("summary.json")) and not list(tmp_path.rglob(".hydra"))
    assert (tmp_path / "multirun.yaml").read_text() == earlier


@pytest.mark.slow
def test_resume_auto_skips_finished_jobs(mnist_root: Path, tmp_path: Path) -> None:
    """A sweep rerun with resume=auto and two more seeds: the two finished jobs are skipped (their
    summaries untouched), the two new ones train as a population."""
    first = train("seed=0,1", *SMALL, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.parent.name: p.read_text() for p in tmp_path.glob("*/summary.json")}
    assert len(before) == 2
    again = train("seed=0,1,2,3", *SMALL, "resume=auto", "hydra/launcher=population", f"hydra.sweep.dir={tmp_path}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete, skipped (resume=auto)" in again.stdout
    assert "population 1: 2 members (jobs #2, #3)" in again.stdout
    after = summaries(tmp_path)
    assert len(after) == 4 and all(s["status"] == "complete" for s in after.values())
    for name, text in before.items():
        assert (tmp_path / name / "summary.json").read_text() == text
    assert all(math.isfinite(s["test_acc"]) for s in after.values())


@pytest.mark.slow
def test_resume_auto_refuses_a_finished_job_of_another_config(mnist_root: Path, tmp_path: Path) -> None:
    """An edited sweep rerun into its folder with resume=auto, its jobs' folders named by number (a probe:
    job 0's finished lr 0.01 run was skipped as the lr 0.5 job's): that job is planned as invalid and fails in
    its one line, its folder untouched; the job of the same config is skipped, as in a sequential sweep."""
    numbered = [*SMALL, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=j${hydra.job.num}"]
    assert train("lr=0.01,0.1", *numbered).returncode == 0
    before = {p.parent.name: p.read_text() for p in tmp_path.glob("*/summary.json")}
    again = train("lr=0.5,0.1", "resume=auto", *numbered)
    assert again.returncode == 1, again.stderr[-3000:]
    line = ("holds a finished run of another config (lr: 0.01 there, 0.5 here; optimizer.lr: 0.01 there, 0.5 here); "
            "skipping it would report that run as this job's")
    assert "job #0 invalid: resume=auto: " in again.stdout and line in again.stdout
    assert line in again.stderr and "Traceback" not in again.stderr
    assert "already complete, skipped (resume=auto)" in again.stdout
    assert {p.parent.name: p.read_text() for p in tmp_path.glob("*/summary.json")} == before


@pytest.mark.slow
def test_a_members_half_written_summary_is_removed_when_it_trains_again(mnist_root: Path, tmp_path: Path) -> None:
    """A kill mid-write leaves .summary.json.tmp<pid> in a member's folder; the resumed population removes it,
    as a single run does (a probe: it stayed after the sweep finished)."""
    first = train("seed=0,1", *SMALL, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    for folder in tmp_path.glob("[01]_*"):  # both killed before their first epoch ended: one population again
        saved = json.loads((folder / "summary.json").read_text())
        (folder / "summary.json").write_text(json.dumps({**saved, "status": "running", "epochs": []}))
    member = next(tmp_path.glob("1_*"))
    (member / ".summary.json.tmp999999999").write_text("{half")
    again = train("seed=0,1", *SMALL, "resume=auto", "hydra/launcher=population", f"hydra.sweep.dir={tmp_path}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not list(member.glob(".summary.json.tmp*")) and summaries(tmp_path)[member.name]["status"] == "complete"


def test_resume_auto_refuses_a_job_whose_folder_holds_a_run_of_another_config(mnist_root: Path,
                                                                              tmp_path: Path) -> None:
    """A value fixed outside the job's folder name (a sweep file, an experiment) changed between a
    stopped sweep and its rerun: the job fails alone with the single run's line, its folder untouched."""
    from optimlab.summary import RunSummary, write_summary

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, "resume=auto", "regimes.fit_acc=0.8"], return_hydra_config=True)
    job = Job(0, [], cfg, tmp_path / "0")
    recorded = OmegaConf.to_container(job.config, resolve=True)
    recorded["regimes"] = {**recorded["regimes"], "fit_acc": 0.9}
    job.run_dir.mkdir()
    write_summary(job.run_dir, RunSummary(status="interrupted", config=recorded, epochs=[{"epoch": 1}]))
    before = (job.run_dir / "summary.json").read_text()
    plan.classify(job)
    assert job.key is None and "regimes.fit_acc: 0.9 there, 0.8 here" in str(job.error)
    assert (job.run_dir / "summary.json").read_text() == before
    # a summary it cannot read (a member keeps no checkpoint): the single-run path's refusal, not a population
    (job.run_dir / "summary.json").write_text("{ not json")
    unreadable = Job(0, [], cfg, tmp_path / "0")
    plan.classify(unreadable)
    assert unreadable.key is None and unreadable.alone == "its summary.json cannot be read"


def test_a_crashed_population_fails_each_member(mnist_root: Path, tmp_path: Path) -> None:
    """An error inside a population (here members the grouping would never put together: another
    eval_batch_size) leaves each member a crashed summary with the error, and its job fails with it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        configs = [compose("config", overrides=[*SMALL, f"data.eval_batch_size={size}"], return_hydra_config=True)
                   for size in (100, 200)]
    jobs = [Job(i, [], cfg, tmp_path / str(i)) for i, cfg in enumerate(configs)]
    results = train_members(jobs, "population 1")
    assert [s.status for s in results] == ["crashed", "crashed"]
    assert all("ValueError: data.eval_batch_size differs between members" in s.error for s in results)
    with hydra_config_of(jobs[0].sweep_config), pytest.raises(PopulationCrashed, match="population 1 crashed"):
        finish_member(jobs[0], results[0])(jobs[0].config)
    assert json.loads((tmp_path / "0" / "summary.json").read_text())["status"] == "crashed"


def test_a_member_whose_files_cannot_be_written_fails_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a population's process, a member whose files cannot be written (its logs: a full disk) is recorded
    crashed and its job fails; the members written before and after it keep their finished records, also
    where the population's process then dies (a review: every member had been marked crashed)."""
    from optimlab.population import records
    from optimlab.summary import RunSummary

    jobs = [SimpleNamespace(run_dir=tmp_path / str(m), config={}, sweep_config=None) for m in range(3)]
    finished = [RunSummary(status="complete", config={}, epochs=[{"epoch": 1, "train_loss": 0.5}], test_acc=0.9)
                for _ in jobs]
    monkeypatch.setattr(launcher, "train_members", lambda members, name: list(finished))
    monkeypatch.setattr(launcher, "save_member_job_record", lambda job: None)
    monkeypatch.setattr(launcher, "hydra_config_of", lambda cfg: contextlib.nullcontext())

    def write_logs(run_dir: Path, summary: RunSummary) -> None:
        if run_dir == jobs[1].run_dir:
            raise OSError("no space left")

    monkeypatch.setattr(records, "write_logs", write_logs)
    results, stop = launcher.train_and_record(jobs, "population 1")
    assert [s.status for s in results] == ["complete", "crashed", "complete"] and stop is None
    assert results[1].error == "OSError: no space left"
    assert [json.loads((job.run_dir / "summary.json").read_text())["status"] for job in jobs] == \
        ["complete", "crashed", "complete"]
    # the population's job failed after all: what was recorded finished stays so
    failed, _ = launcher.failed_and_recorded(jobs, "population 1", "processes job 1 failed: killed")
    assert [s.status for s in failed] == ["complete", "crashed", "complete"]
    assert failed[1].error == "OSError: no space left"  # its files again not written: said so, not raised
    assert [json.loads((job.run_dir / "summary.json").read_text())["status"] for job in jobs] == \
        ["complete", "crashed", "complete"]
    # its .hydra/ record failing first (before its summary is written): the summary says crashed too
    monkeypatch.setattr(launcher, "save_member_job_record", lambda job: (_ for _ in ()).throw(OSError("read-only")))
    results, _ = launcher.train_and_record(jobs[:1], "population 1")
    assert results[0].status == "crashed" and json.loads((jobs[0].run_dir / "summary.json").read_text())["error"] == \
        "OSError: read-only"


def test_a_population_stopped_before_its_records_return_keeps_its_members_epochs(mnist_root: Path,
                                                                               tmp_path: Path) -> None:
    """A rerun whose population stops before its members' records are back (here it crashes at start-up)
    leaves each member the epochs its folder held, not an empty record (so did an interrupt there)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        good, bad = ([compose("config", overrides=[*SMALL, f"seed={seed}", *extra], return_hydra_config=True)
                      for seed, extra in ((0, first), (1, second))]
                     for first, second in (([], []), (["data.eval_batch_size=100"], ["data.eval_batch_size=200"])))
    train_members([Job(i, [], cfg, tmp_path / str(i)) for i, cfg in enumerate(good)], "population 1")
    before = [json.loads((tmp_path / str(i) / "summary.json").read_text())["epochs"] for i in range(2)]
    assert [len(epochs) for epochs in before] == [1, 1]
    results = train_members([Job(i, [], cfg, tmp_path / str(i)) for i, cfg in enumerate(bad)], "population 1")
    assert [s.status for s in results] == ["crashed", "crashed"] and [s.epochs for s in results] == before
    assert all("eval_batch_size differs between members" in s.error for s in results)
    assert [json.loads((tmp_path / str(i) / "summary.json").read_text())["epochs"] for i in range(2)] == before


def train_two_members(tmp_path: Path, *overrides: str) -> list[str]:
    """Seeds 0 and 1 of the SMALL config with ``overrides``, trained as one population in this
    process (``train_members``); their summaries' statuses."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        configs = [compose("config", overrides=[*SMALL, f"seed={seed}", *overrides], return_hydra_config=True)
                   for seed in (0, 1)]
    results = train_members([Job(i, [], cfg, tmp_path / str(i)) for i, cfg in enumerate(configs)], "population 1")
    return [summary.status for summary in results]


def test_a_population_applies_trainer_deterministic_as_lightning_does_for_a_run(
        mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``trainer.deterministic=true``: the population trains with torch's deterministic algorithms
    (and the cuBLAS setting they need on a GPU), as Lightning sets them for each single run."""
    calls: list[bool] = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda mode, **kw: calls.append(mode))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored after the test, whatever it was
    assert train_two_members(tmp_path, "trainer.deterministic=true") == ["complete", "complete"]
    assert calls == [True] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


# How many more blocks malloc maps (mmap) for a 64 MB tensor in a process of its own (the setting is
# process-wide): with glibc's defaults, then, once that tensor is freed, after keep_freed_memory().
MAPPED_BLOCKS = """
import ctypes, torch
from optimlab.population.launcher import keep_freed_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
def mapped_for_a_block():
    before = libc.mallinfo2().hblks
    block = torch.empty(64 * 2**20, dtype=torch.uint8)
    return libc.mallinfo2().hblks - before
print(mapped_for_a_block(), keep_freed_memory(), mapped_for_a_block())
"""


LIBC, LIBC_VERSION = platform.libc_ver()


@pytest.mark.skipif(LIBC != "glibc" or tuple(int(n) for n in LIBC_VERSION.split(".")[:2]) < (2, 33),
                    reason="mallopt and mallinfo2 (glibc >= 2.33)")
def test_a_cpu_population_keeps_freed_memory_for_reuse(mnist_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tensor is mapped afresh by glibc's defaults (and faulted in page by page each step);
    after ``keep_freed_memory()`` it comes from the heap that earlier steps freed. A population on the
    CPU asks for it before it builds anything."""
    mapped = processes.run("-c", MAPPED_BLOCKS)  # 64 MB: above glibc's largest dynamic mmap threshold (32 MB)
    assert mapped.stdout.split() == ["1", "True", "0"], mapped.stderr[-3000:]
    calls: list[str] = []
    monkeypatch.setattr(launcher, "keep_freed_memory", lambda: calls.append("asked"))
    assert train_two_members(tmp_path) == ["complete", "complete"] and calls == ["asked"]


# ---------------------------------------------------------------------------- checkpoints and resume

# Runs train.py with the population's checkpoint save patched to send the process `signal` right
# after the first checkpoint is written: a kill at a known moment (after epoch 1, before its summaries).
SIGNAL_AFTER_FIRST_CHECKPOINT = """
import os, runpy, signal, sys
from optimlab.population.checkpoint import PopulationCheckpoint
save = PopulationCheckpoint.save
def save_then_signal(self, *args, **kwargs):
    save(self, *args, **kwargs)
    os.kill(os.getpid(), signal.{signal})
PopulationCheckpoint.save = save_then_signal
sys.argv = [sys.argv[1], "-m", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
RESUMABLE = ["lr=0.05,0.1", "seed=0,1", "data.subset=512", "data.val_size=500", "epochs=3", "model.hidden=[16]",
             "trainer.accelerator=cpu", "trainer.num_threads=1", "hydra/launcher=population",
             "curvature.every_n_steps=3", "curvature.probe_size=64",  # tracking's state resumes too
             "trainer.log_every_n_steps=5",  # and per-step rows (steps 0, 5, 10)
             "logger=many"]  # TensorBoard and CSV


def untimed(summary: dict) -> dict:
    """What an interrupted-and-resumed member must share bitwise with an uninterrupted one."""
    rows = [{k: v for k, v in row.items() if k != "train_time_s"} for row in summary["epochs"]]
    return {"epochs": rows, **{k: summary[k] for k in ("status", "steps", "test_acc", "test_loss", "regime",
                                                        "diverged_at_step", "best_val_acc", "train_steps")}}


# Runs train.py with each member's record written, then, after the first finished one, SIGINT sent to the
# process: a stop while a trained population's members are being finished.
SIGINT_WHILE_FINISHING = """
import os, runpy, signal, sys
from optimlab.population import launcher
write = launcher.write_member
sent = []
def write_then_signal(run_dir, summary):
    write(run_dir, summary)
    if not sent and summary.status == "complete":
        sent.append(os.kill(os.getpid(), signal.SIGINT))
launcher.write_member = write_then_signal
sys.argv = [sys.argv[1], "-m", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Runs train.py with SIGINT sent to the process while the population's last epoch is being recorded
# (its evaluation, checkpoint and summaries), where a stop is held until the epoch is saved.
SIGINT_IN_THE_LAST_EPOCHS_RECORD = """
import os, runpy, signal, sys
from optimlab.population.loop import PopulationLoop
finish = PopulationLoop.finish_epoch
def signal_then_finish(self, *args, **kwargs):
    if self.epochs_done == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return finish(self, *args, **kwargs)
PopulationLoop.finish_epoch = signal_then_finish
sys.argv = [sys.argv[1], "-m", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inline", "processes"])
def test_a_stop_held_while_the_last_epoch_is_recorded_still_stops(mnist_root: Path, tmp_path: Path,
                                                                   executor: str) -> None:
    """The signal (to the process that trains) is held until the epoch is saved, then raised: the
    population ends interrupted with both epochs recorded (exit 130), not tested and complete as if
    no one had asked it to stop."""
    stopped = processes.run("-c", SIGINT_IN_THE_LAST_EPOCHS_RECORD, str(REPO / "train.py"), "seed=0,1", *SMALL,
                            "epochs=2", "hydra/launcher=population", f"hydra.launcher.executor={executor}",
                            f"hydra.sweep.dir={tmp_path}", cwd=REPO, timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    runs = summaries(tmp_path)
    assert len(runs) == 2 and all(s["status"] == "interrupted" and len(s["epochs"]) == 2 and s["test_acc"] is None
                                  for s in runs.values())


# SIGINT_IN_THE_LAST_EPOCHS_RECORD with every member's logs failing to be written.
SIGINT_WITH_LOGS_FAILING = SIGINT_IN_THE_LAST_EPOCHS_RECORD.replace("""PopulationLoop.finish_epoch = signal_then_finish
""", """PopulationLoop.finish_epoch = signal_then_finish
from optimlab.population import launcher
def fail(*args):
    raise OSError("no space left on device")
launcher.write_logs = fail
""")


@pytest.mark.slow
@pytest.mark.parametrize("failing,said_line,written", [
    ("write_logs", "its logs of the epochs so far were not written", ".hydra/config.yaml"),
    ("save_member_job_record", "its job record was not written", "tensorboard")])
def test_a_stop_whose_logs_cannot_be_written_still_records_and_stops(mnist_root: Path, tmp_path: Path, failing: str,
                                                                     said_line: str, written: str) -> None:
    """A stopped population writes its members' summaries first, then their job records and logs of the
    epochs so far: one that fails (a full disk) leaves the summaries interrupted, the other still written,
    and the stop goes on (exit 130), saying which member's files are missing, instead of a traceback and
    members left 'running'."""
    script = SIGINT_WITH_LOGS_FAILING.replace("launcher.write_logs = fail", f"launcher.{failing} = fail")
    assert f"launcher.{failing} = fail" in script
    stopped = processes.run("-c", script, str(REPO / "train.py"), "seed=0,1", *SMALL, "epochs=2",
                            "hydra/launcher=population", "hydra.launcher.executor=inline", f"hydra.sweep.dir={tmp_path}",
                            cwd=REPO, timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    runs = summaries(tmp_path)
    assert len(runs) == 2 and all(s["status"] == "interrupted" and len(s["epochs"]) == 2 for s in runs.values())
    assert all((tmp_path / name / written).exists() for name in runs)
    said = stopped.stdout + stopped.stderr
    assert said.count(said_line) == 2, said[-3000:]
    assert "OSError: no space left on device" in said


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["inline", "processes"])
def test_a_stop_while_members_are_finished_waits_for_the_last(mnist_root: Path, tmp_path: Path, executor: str) -> None:
    """SIGINT (to the process that writes the members' files) once the first of four trained members
    is written: every member is still finished (summary with its test result, TensorBoard events,
    .hydra/), then the sweep exits 130 saying so; before, the other three were left without their
    test results."""
    stopped = processes.run("-c", SIGINT_WHILE_FINISHING, str(REPO / "train.py"), "seed=0,1,2,3", *SMALL,
                            "hydra/launcher=population", f"hydra.launcher.executor={executor}",
                            f"hydra.sweep.dir={tmp_path}", cwd=REPO, timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped (SIGINT) once population 1's members were finished" in stopped.stderr
    runs = summaries(tmp_path)
    assert len(runs) == 4 and all(s["status"] == "complete" and 0 <= s["test_acc"] <= 1 for s in runs.values())
    for name in runs:
        assert list((tmp_path / name / "tensorboard").rglob("events.out.tfevents.*"))
        assert (tmp_path / name / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / ".populations").exists()  # its checkpoint removed, and the folder (it was left, empty)


@pytest.fixture(scope="module")
def uninterrupted_population(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The RESUMABLE sweep trained straight through (inline; forked populations record the same, tested
    below): its ``folder``, and by job folder each member's :func:`untimed` ``summaries``, TensorBoard
    scalars (``events``) and CSV rows (``csv``)."""
    sweep = tmp_path_factory.mktemp("straight")
    straight = train(*RESUMABLE, "hydra.launcher.executor=inline", f"hydra.sweep.dir={sweep}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    expected = {name: untimed(s) for name, s in summaries(sweep).items()}
    assert len(expected) == 4 and all(len(s["epochs"]) == 3 for s in expected.values())
    assert all([row["step"] for row in s["train_steps"]] == [0, 5, 10] for s in expected.values())
    return SimpleNamespace(folder=sweep, summaries=expected,
                           events={name: scalar_events(sweep / name / "tensorboard") for name in expected},
                           csv={name: csv_rows(sweep / name / "csv" / "metrics.csv") for name in expected})


@pytest.mark.slow
@pytest.mark.parametrize("executor,sig,code,status", [
    ("inline", "SIGKILL", -9, "running"),
    ("inline", "SIGTERM", 143, "interrupted"),
    # The process that trains the population is a child of the launcher: killed, its members are recorded
    # crashed (the sweep goes on and exits 1); stopped, the sweep stops as it did.
    ("processes", "SIGKILL", 1, "crashed"),
    ("processes", "SIGTERM", 143, "interrupted")])
def test_a_killed_or_stopped_population_resumes_bitwise(mnist_root: Path, tmp_path: Path, executor: str, sig: str,
                                                        code: int, status: str,
                                                        uninterrupted_population: SimpleNamespace) -> None:
    """Four members, three epochs (float32, CPU, one thread). SIGKILL to the process that trains
    them right after epoch 1's checkpoint, or SIGTERM there (summaries 'interrupted', exit 143);
    rerun with resume=auto: the population continues from its checkpoint and every member's summary
    equals the uninterrupted population's (epoch rows but their times, test accuracy and loss),
    bitwise; the checkpoint is removed at the end. A stopped or crashed member's folder holds its
    TensorBoard scalars and CSV rows so far, as its run's would; resumed, one event file with all of them
    and the CSV rows of the uninterrupted member (replaced, not appended to)."""
    straight, straight_events = uninterrupted_population.summaries, uninterrupted_population.events
    resumable = [*RESUMABLE, f"hydra.launcher.executor={executor}", f"hydra.sweep.dir={tmp_path}"]
    killed = processes.run("-c", SIGNAL_AFTER_FIRST_CHECKPOINT.format(signal=sig), str(REPO / "train.py"), *resumable,
                           cwd=REPO, timeout=300)
    assert killed.returncode == code, killed.stderr[-3000:]
    [checkpoint] = (tmp_path / ".populations").glob("*.ckpt")
    assert {s["status"] for s in summaries(tmp_path).values()} == {status}
    for name, summary in summaries(tmp_path).items():  # its loggers hold the epochs its summary holds, if not running
        done = 0 if status == "running" else len(summary["epochs"])
        assert done >= 1 or sig == "SIGKILL"  # a stopped population records its first epoch (a killed one may not)
        job_record = tmp_path / name / ".hydra" / "config.yaml"  # Hydra's record of the job, as a stopped run's
        assert job_record.is_file() == (status != "running"), name
        if status != "running":
            assert job_record.read_text() == (uninterrupted_population.folder / name / ".hydra" / "config.yaml").read_text()
        folder = tmp_path / name / "tensorboard"
        stopped = scalar_events(folder) if folder.is_dir() else {}
        assert stopped.get("val/acc", []) == straight_events[name]["val/acc"][:done]
        if done:
            header, rows = csv_rows(tmp_path / name / "csv" / "metrics.csv")
            expected_header, expected_rows = uninterrupted_population.csv[name]
            column, expected_column = header.index("val/acc"), expected_header.index("val/acc")
            assert [row[column] for row in rows if row[column] is not None] == \
                [row[expected_column] for row in expected_rows if row[expected_column] is not None][:done]
    assert all(s["population"]["checkpoint"] == str(checkpoint) for s in summaries(tmp_path).values())
    if sig == "SIGTERM":
        assert "rerun the sweep with resume=auto to continue from its checkpoint" in killed.stderr
    if executor == "inline":
        resumed = train(*resumable, "resume=auto")
    else:  # in a process of its own: a forked child's lines reach the real stdout, not the test's capture
        resumed = processes.run(str(REPO / "train.py"), "-m", *resumable, "resume=auto", cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"population 1: resumed from {checkpoint} after epoch 1" in resumed.stdout
    assert "population 1: epoch   1/3" not in resumed.stdout and "population 1: epoch   3/3" in resumed.stdout
    got = summaries(tmp_path)
    assert {name: untimed(s) for name, s in got.items()} == straight
    for name in straight:
        assert len(list((tmp_path / name / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert scalar_events(tmp_path / name / "tensorboard") == straight_events[name]
        assert csv_rows(tmp_path / name / "csv" / "metrics.csv") == uninterrupted_population.csv[name]
        if status != "running":  # its job record, written when it stopped, is kept, as a continued run's (a probe)
            for record in ("config.yaml", "overrides.yaml"):
                assert (tmp_path / name / ".hydra" / record).read_text() == \
                    (uninterrupted_population.folder / name / ".hydra" / record).read_text()
    assert all(s["population"]["checkpoint"] is None for s in got.values()) and not checkpoint.exists()
    assert not checkpoint.parent.exists()  # the sweep's .populations/, empty, is removed too


# Runs train.py and SIGKILLs it once the {count}-th member's files are written (its summary complete).
SIGKILL_WHILE_FINISHING = """
import os, runpy, signal, sys
from optimlab.population import launcher
write = launcher.write_member
written = []
def write_then_kill(run_dir, summary):
    write(run_dir, summary)
    written.append(run_dir)
    if len(written) == {count}:
        os.kill(os.getpid(), signal.SIGKILL)
launcher.write_member = write_then_kill
sys.argv = [sys.argv[1], "-m", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("finished,rerun", [(1, ()), (3, ()), (4, ()), (1, ("population.max_members=2",))])
def test_a_population_killed_while_its_members_are_finished_resumes(mnist_root: Path, tmp_path: Path, finished: int,
                                                                     rerun: tuple[str, ...],
                                                                     uninterrupted_population: SimpleNamespace) -> None:
    """SIGKILL once ``finished`` of the four trained members are written (complete), the checkpoint still there.
    Rerun with resume=auto: the population is put together again, complete members too, resumes from its
    checkpoint with nothing left to train and finishes the rest: every member equals the uninterrupted one and
    the checkpoint is gone. Before, the rest formed a population of their own, which had no checkpoint and
    trained again; one job left ran alone, where its record (epochs, no checkpoint of a run) was refused on
    every rerun. It stays whole with a smaller max_members (it would have trained again, split in two). With all
    four written, the rerun skips them and removes the checkpoint left behind (a dry run leaves it)."""
    resumable = [*RESUMABLE, "hydra.launcher.executor=inline", f"hydra.sweep.dir={tmp_path}"]
    killed = processes.run("-c", SIGKILL_WHILE_FINISHING.format(count=finished), str(REPO / "train.py"), *resumable,
                           cwd=REPO, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    [checkpoint] = (tmp_path / ".populations").glob("*.ckpt")
    assert sorted(s["status"] for s in summaries(tmp_path).values()) == \
        ["complete"] * finished + ["running"] * (4 - finished)
    assert train(*resumable, "resume=auto", "population.dry_run=true").returncode == 0
    assert checkpoint.is_file()
    resumed = train(*resumable, "resume=auto", *rerun)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if finished < 4:
        assert "4 in 1 population(s), 0 alone" in resumed.stdout
        assert f"population 1: resumed from {checkpoint} after epoch 3" in resumed.stdout
    got = summaries(tmp_path)
    assert {name: untimed(s) for name, s in got.items()} == uninterrupted_population.summaries
    for name in got:
        assert len(list((tmp_path / name / "tensorboard").glob("events.out.tfevents.*"))) == 1
        assert scalar_events(tmp_path / name / "tensorboard") == uninterrupted_population.events[name]
    assert not checkpoint.parent.exists()


def test_a_population_sweep_into_a_folder_another_one_runs_in_is_refused(mnist_root: Path, tmp_path: Path) -> None:
    """Two population sweeps in one folder at once (a rerun while the first still runs) would train the same
    populations into the same folders: the second is refused in one line and starts no job."""
    from optimlab.files import hold

    descriptor = hold(tmp_path)  # as the running sweep's launcher holds it (a lock of another open file)
    try:
        refused = train("seed=0,1", *SMALL, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path}")
    finally:
        os.close(descriptor)
    assert refused.returncode == 1
    assert f"{tmp_path}: another population sweep is running in this folder now" in refused.stderr
    assert "Traceback" not in refused.stderr and not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_a_job_whose_folder_another_process_runs_in_fails_alone_and_writes_nothing(mnist_root: Path,
                                                                                   tmp_path: Path) -> None:
    """A review: a run resumed in a member's folder and the sweep rerun at once both trained that member. The
    sweep's job whose folder another process holds fails alone, writing nothing there; and a job that runs in
    the sweep folder itself (hydra.sweep.subdir=.) is not refused by its own sweep's hold."""
    from optimlab.files import hold

    busy = tmp_path / "sweep" / "job0"
    busy.mkdir(parents=True)
    descriptor = hold(busy)  # as a run in another process holds it
    try:
        result = train("seed=0,1", *SMALL, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                       "hydra.sweep.subdir=job${hydra.job.num}")
    finally:
        os.close(descriptor)
    assert result.returncode == 1
    assert f"error: {busy}: another process is running in this folder now" in result.stderr
    assert not list(busy.iterdir()) and summaries(tmp_path / "sweep")["job1"]["status"] == "complete"
    alone = train("seed=0", *SMALL, "hydra/launcher=population", f"hydra.sweep.dir={tmp_path / 'one'}",
                  "hydra.sweep.subdir=.")
    assert alone.returncode == 0, alone.stderr[-2000:]


def test_a_members_logs_leave_a_shared_tensorboard_folders_other_files(uninterrupted_population: SimpleNamespace,
                                                                        tmp_path: Path) -> None:
    """A member's write removes the event files an earlier write of its own left in its folder, never those
    in a folder outside it (``logger.tensorboard.save_dir``), which other members write into too."""
    from optimlab.population.records import write_member

    name = next(iter(uninterrupted_population.summaries))
    summary = read_summary(uninterrupted_population.folder / name)
    summary.config["logger"] = {"tensorboard": {**summary.config["logger"]["tensorboard"],
                                                "save_dir": str(tmp_path / "shared")}}
    for member in ("a", "b"):
        write_member(tmp_path / member, summary)
    assert len(list((tmp_path / "shared").glob("events.out.tfevents.*"))) == 2


@pytest.mark.slow
def test_populations_in_forked_processes_record_what_inline_ones_do(mnist_root: Path, tmp_path: Path) -> None:
    """Two populations (SGD, Adam) trained in two forked processes at once: every job's summary,
    TensorBoard scalars and ``.hydra/`` record are those of the same sweep trained in this process
    (bitwise on the CPU at one thread; times aside), ``hydra.runtime.output_dir`` included."""
    grid = ["optimizer=sgd,adam", "lr=0.05,0.1", "seed=0,1", *SMALL, "epochs=2", "trainer.num_threads=1",
            "hydra/launcher=population"]
    for executor in ("inline", "processes"):
        result = train(*grid, f"hydra.launcher.executor={executor}", "hydra.launcher.max_parallel=2",
                       f"hydra.sweep.dir={tmp_path / executor}")
        assert result.returncode == 0, result.stderr[-3000:]
    inline, forked = summaries(tmp_path / "inline"), summaries(tmp_path / "processes")
    assert len(inline) == 8 and {name: untimed(s) for name, s in forked.items()} == \
        {name: untimed(s) for name, s in inline.items()}
    assert {s["population"]["name"] for s in forked.values()} == {"population 1", "population 2"}
    for name in inline:
        assert scalar_events(tmp_path / "processes" / name / "tensorboard") == \
            scalar_events(tmp_path / "inline" / name / "tensorboard")
        for record in ("config.yaml", "overrides.yaml"):
            assert (tmp_path / "processes" / name / ".hydra" / record).read_text() == \
                (tmp_path / "inline" / name / ".hydra" / record).read_text()
        hydra_record = OmegaConf.load(tmp_path / "processes" / name / ".hydra" / "hydra.yaml")
        assert hydra_record.hydra.runtime.output_dir == str(tmp_path / "processes" / name)


@pytest.mark.slow
def test_forked_populations_start_largest_first(mnist_root: Path, tmp_path: Path) -> None:
    """One process at a time: the width-64 population starts first, then width 16, then 8 (in the plan
    they are 1, 2, 3), so that the largest does not train alone at the end."""
    result = train("lr=0.01,0.1", "model.hidden=[8],[16],[64]", *SMALL[:3], "trainer.accelerator=cpu",
                   "hydra/launcher=population", "hydra.launcher.executor=processes", "hydra.launcher.max_parallel=1",
                   f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    starts = [line.split(":")[0] for line in result.stdout.splitlines() if " members (jobs " in line and " in process " in line]
    assert starts == ["population 3", "population 2", "population 1"], result.stdout[-3000:]
    assert "mlp 8, sgd, 1 epoch of batch 128" in result.stdout
    assert "  where: 3 population(s) in forked processes, 1 at once, one torch thread each\n" in result.stdout


def test_a_line_is_one_write() -> None:
    """Lines of forked populations sharing a console: each written whole (print writes the newline
    apart, and two processes' lines ran into each other)."""
    from optimlab.console import say

    class Stream:
        writes: list[str] = []

        def write(self, text: str) -> None:
            self.writes.append(text)

        def flush(self) -> None:
            self.writes.append("<flush>")

    say("population 1: epoch   1/2", Stream())
    assert Stream.writes == ["population 1: epoch   1/2\n", "<flush>"]


# Runs train.py with launcher.{name} doing {action} first: in the launcher, while it finishes the members
# of a population that trained in a child.
WHILE_THE_LAUNCHER_FINISHES = """
import os, runpy, signal, sys
from optimlab.population import launcher
real = launcher.{name}
def hooked(*args, **kwargs):
    {action}
    return real(*args, **kwargs)
launcher.{name} = hooked
sys.argv = [sys.argv[1], "-m", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("name,action,code", [("run_composed_job", "raise RuntimeError('finishing failed')", 1),
                                              ("log_epoch_lines", "os.kill(os.getpid(), signal.SIGINT)", 130)])
def test_a_launcher_that_stops_while_finishing_stops_the_populations_still_training(
        mnist_root: Path, tmp_path: Path, name: str, action: str, code: int) -> None:
    """Two populations at once: 300 epochs and 1 epoch. While the launcher finishes the short one's
    members, an error escapes it, or SIGINT reaches it: the long one is stopped (its members
    'interrupted'), and the launcher exits (1, 130) instead of waiting for it to train on."""
    started = time.perf_counter()
    result = processes.run("-c", WHILE_THE_LAUNCHER_FINISHES.format(name=name, action=action),
                           str(REPO / "train.py"), "lr=0.01,0.1", "epochs=1,300", *SMALL[:2], "model.hidden=[8]",
                           "trainer.accelerator=cpu", "hydra/launcher=population", "hydra.launcher.executor=processes",
                           "hydra.launcher.max_parallel=2", f"hydra.sweep.dir={tmp_path}", cwd=REPO, timeout=300)
    assert result.returncode == code, result.stderr[-3000:]
    runs = summaries(tmp_path)
    statuses = sorted((s["config"]["epochs"], s["status"]) for s in runs.values())
    assert statuses == [(1, "complete"), (1, "complete"), (300, "interrupted"), (300, "interrupted")], statuses
    assert all(len(s["epochs"]) < 300 for s in runs.values() if s["config"]["epochs"] == 300)
    if code == 130:
        assert "stopped (SIGINT) once population" in result.stderr
    assert time.perf_counter() - started < 150


# Runs train.py; once the population's child process has saved epoch 1's checkpoint, it sends
# {signal} to the launcher (its parent).
SIGNAL_TO_THE_LAUNCHER = """
import os, runpy, signal, sys
from optimlab.population.checkpoint import PopulationCheckpoint
save = PopulationCheckpoint.save
launcher, sent = os.getpid(), []
def save_then_signal(self, *args, **kwargs):
    save(self, *args, **kwargs)
    if os.getpid() != launcher and not sent:  # once: a killed launcher is gone by the next checkpoint
        sent.append(os.kill(launcher, signal.{signal}))
PopulationCheckpoint.save = save_then_signal
sys.argv = [sys.argv[1], "-m", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="a child learns of its parent's death on Linux only")
@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGKILL", -9)])
def test_a_stopped_or_killed_launcher_stops_its_populations(mnist_root: Path, tmp_path: Path, sig: str,
                                                            code: int) -> None:
    """SIGINT or SIGTERM to the launcher while a forked population trains: it passes the signal on,
    waits for the population to stop (members 'interrupted' after an epoch or a few: the signal may
    take that long to arrive on a busy machine) and exits as a run does; SIGKILL: the orphaned
    population gets SIGTERM and stops the same way, instead of training on (and writing into the
    folders a rerun would use)."""
    stopped = processes.run("-c", SIGNAL_TO_THE_LAUNCHER.format(signal=sig), str(REPO / "train.py"), *RESUMABLE,
                            "epochs=30", "hydra.launcher.executor=processes", f"hydra.sweep.dir={tmp_path}",
                            cwd=REPO, timeout=300)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    for _ in range(600):  # after a SIGKILL the child stops on its own: wait for its last summary
        runs = summaries(tmp_path)
        if {s["status"] for s in runs.values()} == {"interrupted"}:
            break
        time.sleep(0.1)
    assert len(runs) == 4 and all(s["status"] == "interrupted" and 1 <= len(s["epochs"]) < 30 for s in runs.values()), \
        [(s["status"], len(s["epochs"])) for s in runs.values()]
    if sig != "SIGKILL":
        assert "stopped: cancelling 1 running process\n" in stopped.stderr
        assert f"population 1 interrupted ({sig})" in stopped.stderr


def test_a_member_whose_events_cannot_be_written_is_recorded_crashed(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from optimlab.population import records
    from optimlab.summary import RunSummary

    def failing(*args: object) -> None:
        raise OSError("event file gone")

    monkeypatch.setattr(records, "write_logs", failing)
    finished = RunSummary(status="complete", config={}, epochs=[{"epoch": 1, "train_loss": 0.5}], test_acc=0.9)
    with pytest.raises(OSError, match="event file gone"):
        records.write_member(tmp_path, finished)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["status"] == "crashed" and saved["error"] == "OSError: event file gone"
    assert saved["epochs"] == finished.epochs and saved["test_acc"] == 0.9 and finished.status == "complete"


@pytest.mark.parametrize("override,line", [
    ("population.max_members=0", "population.max_members (hydra.launcher.max_members): 0 is not allowed; "
                                 "expected an integer >= 1"),
    ("population.dry_run=maybe", "population.dry_run (hydra.launcher.dry_run): 'maybe' is not allowed; "
                                 "expected true or false"),
    ("hydra.launcher.executor=nope", "hydra.launcher.executor: 'nope' is not allowed; expected one of auto, inline, "
                                     "processes, submitit_local, submitit_slurm"),
    # typed knobs had OmegaConf's multi-line error, an unknown one an instantiation TypeError (a probe)
    ("hydra.launcher.executor=null", "hydra.launcher.executor: None is not allowed"),
    ("hydra.launcher.max_parallel=1.5", "hydra.launcher.max_parallel: 1.5 is not allowed; expected null or an integer >= 1"),
    ("+hydra.launcher.bogus=1", "hydra.launcher.bogus: not a knob of hydra/launcher=population; expected one of "
                                "max_members, max_memory_gib, dry_run, executor, max_parallel, submitit_folder, submitit"),
    ("hydra.launcher.executor=submitit_local hydra.launcher.submitit.timeout_min=-5",
     "hydra.launcher.submitit.timeout_min: -5 is not allowed; expected an integer >= 1"),
    # swept, it would be ignored: refused before Hydra lists the jobs or writes multirun.yaml (a probe)
    ("population.max_members=8,16", "population.max_members=8,16: the population launcher's plan is one for the whole "
                                    "sweep; give population.* a single value, not a sweep")])
def test_a_bad_launcher_knob_on_the_command_line_is_one_line(tmp_path: Path, override: str, line: str) -> None:
    # an override interpolating the job's Hydra config (a review: the knobs' check had failed on it, unnoticed)
    result = train("hydra/launcher=population", "lr=0.01,0.1", "seed=${hydra:job.num}", *override.split(),
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2 and result.stderr.strip().startswith(f"error: {line}"), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and not (tmp_path / "sweep").exists()
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("how, add", [(["-m", "hydra/launcher=basic", "lr=0.01,0.1"], "hydra/launcher=population"),
                                      ([], "-m hydra/launcher=population")])
def test_a_dry_run_with_another_launcher_or_in_a_single_run_is_refused(tmp_path: Path, how: list[str], add: str) -> None:
    """The basic launcher would train every job of a sweep asked only to be planned; a single run, itself."""
    result = run_script(REPO / "train.py", *how, "population.dry_run=true", f"hydra.sweep.dir={tmp_path / 'out'}",
                        f"hydra.run.dir={tmp_path / 'out'}")
    line = f"population.dry_run: true plans a sweep of hydra/launcher=population only; add {add}, or leave dry_run out"
    assert result.returncode == 2 and result.stderr.strip() == f"error: {line}", result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_dry_run_of_a_search_is_refused(tmp_path: Path) -> None:
    """A search has no plan before it runs (a probe: each batch was planned, then Optuna's traceback)."""
    result = run_script(REPO / "train.py", "hparams_search=optuna", "hydra/launcher=population", "population.dry_run=true",
                        "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: population.dry_run: a search draws each batch of trials from the earlier ones' results, so there is no "
        "plan of it to print before it runs; leave dry_run out"), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stop", [KeyboardInterrupt("SIGINT"), SystemExit(143)])
def test_a_stop_while_submitit_jobs_run_cancels_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      stop: BaseException) -> None:
    """Ctrl-C, or train.py's handler of a signal (SystemExit) while the launcher polls its jobs: each
    running job is cancelled and waited for, then the stop goes on (before, SystemExit left the jobs
    training on their own). A SLURM job by its cancel (scancel); a local one by SIGTERM to its controller,
    whose pid is its id (a probe: the cancel's SIGINT had the controller print a traceback and kill a large
    population a second later, before its members' records were written)."""
    from optimlab.population import cluster

    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    class FakeJob:
        job_id, calls, paths = str(controller.pid), [], type("Paths", (), {"stdout": "1_0_log.out"})

        def done(self) -> bool:
            return False

        def cancel(self, check: bool) -> None:
            self.calls.append("cancel")

        def wait(self) -> None:
            self.calls.append("wait")

    class FakeAuto:
        def submit(self, *args: object) -> FakeJob:
            FakeJob.calls.append(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)  # what a process started inherits
            return FakeJob()

    def stop_now(seconds: float) -> None:
        raise stop

    handler = signal.getsignal(signal.SIGINT)

    monkeypatch.setattr(cluster.time, "sleep", stop_now)
    try:
        for where in ("slurm", "local"):
            jobs = cluster.run_as_jobs(Executor(FakeAuto, str(tmp_path / "%j"), where), [("population 1", [])],
                                       lambda members, name: [], None, lambda members, name, error: [], str)
            with pytest.raises(type(stop)):
                next(jobs)
        monkeypatch.undo()  # (time.sleep is the time module's own: Popen.wait's timeout sleeps)
        # A local job's controller starts with SIGINT ignored: a Ctrl-C in the terminal reaches it too, and it would
        # kill the job a second later (a review).
        assert FakeJob.calls == [False, "cancel", "wait", True, "wait"]
        assert signal.getsignal(signal.SIGINT) == handler
        assert controller.wait(timeout=30) == -signal.SIGTERM
    finally:
        controller.kill()


def test_a_failed_jobs_line_keeps_what_failed_and_why() -> None:
    """submitit's error holds the job's whole error stream after a line saying which job failed: the line keeps
    that and the stream's end (a probe: the first 600 characters were Lightning's greeting)."""
    from optimlab.population.cluster import failure_line

    err = RuntimeError("Job 7 (task: 0) with path /x/7_0_result.pkl\nhas not produced any output (state: FAILED)\n"
                       "Error stream produced:\n" + "-" * 40 + "\nGPU available: False, used: False\n" + "tip " * 300 +
                       "\nTraceback (most recent call last):\nMemoryError: out of memory\n")
    line = failure_line(err)
    assert len(line) == 600 and "\n" not in line
    assert line.startswith("Job 7 (task: 0) with path /x/7_0_result.pkl has not produced any output (state: FAILED) ...")
    assert line.endswith("tip Traceback (most recent call last): MemoryError: out of memory")
    assert failure_line(RuntimeError("killed")) == "killed" and failure_line(RuntimeError()) == "RuntimeError"
