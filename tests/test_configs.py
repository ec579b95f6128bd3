"""Every experiment and every job of every sweep composes, validates and builds; unknown keys and
bad values are refused with one line naming the key."""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import CONF, compose_config
from hydra_plugins.optimlab_population.population_launcher import (SUBMITIT_PARAMETERS, PopulationLauncher,
                                                                   PopulationLauncherConf)
from optimlab.build import build_parts
from optimlab.curvature import SharpnessCallback, SharpnessTracker
from optimlab.population.curvature import MemberSharpness
from optimlab.regimes import Thresholds
from optimlab.validate import ConfigError, check_shared_folders, parameter_errors, validate_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def sweep_axes(name: str) -> list[list[str]]:
    """Per swept key, its overrides (``lr=0.1``, ...), parsed from the sweep's ``hydra.sweeper.params``
    by Hydra's own override parser."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"sweep {name} sets no hydra.sweeper.params"
    assert cfg.hydra.mode == RunMode.MULTIRUN, f"sweep {name} without -m would run one default job"
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]


def sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of the jobs ``python train.py -m sweep=<name>`` launches."""
    return [[f"sweep={name}", *job] for job in itertools.product(*sweep_axes(name))]


def covering_jobs(name: str, most: int = 50) -> list[list[str]]:
    """Every job of a sweep of at most ``most`` jobs; of a larger one (the maps: hundreds to thousands
    of jobs that take ~0.3-0.5 s each to compose) a set in which every value of every axis appears,
    with the first and the last job."""
    jobs = sweep_jobs(name)
    if len(jobs) <= most:
        return jobs
    axes = sweep_axes(name)
    diagonal = [[f"sweep={name}", *(axis[i % len(axis)] for axis in axes)] for i in range(max(map(len, axes)))]
    return list(map(list, dict.fromkeys(map(tuple, [jobs[0], *diagonal, jobs[-1]]))))  # without repeats


def test_the_regime_experiments_exist() -> None:
    assert {"baseline", "slow", "oscillating", "diverging", "underfit", "overfit", "overfit_small", "cnn",
            "grad_noise", "large_batch", "overfit_early_stop", "overfit_l2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_builds(name: str) -> None:
    cfg = compose_config(f"experiment={name}")
    assert cfg.name == name
    validate_config(cfg)
    parts = build_parts(cfg)
    assert type(parts.module.model).__name__ == cfg.model._target_.rsplit(".", 1)[1]
    assert parts.module.optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "rmsprop"])
@pytest.mark.parametrize("impl", ["custom", "torch"])
def test_the_optimizer_is_built_on_the_weights_the_trainer_trains(optimizer: str, impl: str) -> None:
    """Under a "-true" precision Lightning casts the weights at fit start; the model is cast before the
    optimizer is built, so state made at construction (Adagrad's sum) has the weights' dtype (it was
    float32 under 64-true: that run's Adagrad accumulated in float32)."""
    momentum = ["optimizer.momentum=0.9"] if optimizer in ("sgd", "rmsprop") else []
    for precision, dtype in (("64-true", torch.float64), ("32-true", torch.float32)):
        cfg = compose_config(f"optimizer={optimizer}", f"optimizer.impl={impl}", f"trainer.precision={precision}",
                             *momentum)
        parts = build_parts(cfg)
        assert {p.dtype for p in parts.module.model.parameters()} == {dtype}
        state = [t for s in parts.module.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0]
        assert all(t.dtype == dtype for t in state), precision
        assert bool(state) == (optimizer == "adagrad"), precision  # the one that creates state at construction


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_every_sweep_composes_and_validates(name: str) -> None:
    jobs = covering_jobs(name)
    for job in jobs:
        cfg = compose_config(*job)
        validate_config(cfg)
        for override in job[1:]:  # each swept plain value reached the job's config
            key, value = override.split("=", 1)
            if key not in ("experiment", "optimizer", "model"):
                assert str(OmegaConf.select(cfg, key)).replace(" ", "") == value, override
    assert len(jobs) == len({tuple(j) for j in jobs}) > 1
    assert all(any(value in job for job in jobs) for axis in sweep_axes(name) for value in axis)


def test_the_regime_maps_are_their_grids_at_their_budgets() -> None:
    jobs = sweep_jobs("regime_map")  # half-decades x powers of 2 x 3 seeds, the default fit bar
    assert len(jobs) == 4 * 10 * 9 * 3
    cfg = compose_config(*jobs[-1])
    assert (cfg.optimizer._target_, cfg.lr, list(cfg.model.hidden), cfg.seed) == ("optimlab.optim.RMSprop", 3.16,
                                                                                   [512], 2)
    assert (cfg.data.subset, cfg.epochs, cfg.batch_size, cfg.trainer.limit_train_batches) == (None, 10, 32, 0.1)
    assert cfg.regimes.fit_acc == Thresholds().fit_acc  # the default bar
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra = compose("config", overrides=["sweep=regime_map"], return_hydra_config=True).hydra
    assert hydra.launcher._target_.endswith("PopulationLauncher")
    reduced = sweep_jobs("regime_map_reduced")
    assert len(reduced) == 4 * 6 * 6
    cfg = compose_config(*reduced[-1])
    assert (cfg.optimizer._target_, cfg.lr, list(cfg.model.hidden)) == ("optimlab.optim.RMSprop", 4.0, [2048])


def test_defaults_are_the_notebook_baseline() -> None:
    cfg = compose_config()
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.1, 10, 128)
    assert list(cfg.model.hidden) == [1024, 128] and cfg.model.activation == "tanh"
    assert (cfg.model.init, cfg.model.init_std) == ("normal", 0.1)
    assert cfg.optimizer._target_ == "optimlab.optim.SGD" and cfg.optimizer.lr == 0.1
    overfit = compose_config("experiment=overfit")
    assert list(overfit.model.hidden) == [2048, 1024, 512, 1024, 512, 128]
    assert (overfit.data.label_noise, overfit.lr, overfit.epochs) == (0.5, 0.01, 30)
    cnn = compose_config("model=cnn")
    assert (list(cnn.model.channels), list(cnn.model.fc), cnn.model.init) == ([12, 16], [120, 84], "stax")


@pytest.mark.parametrize("override, key", [
    ("+foo=1", "foo"), ("+trainer.gradient_clipping=1.0", "trainer.gradient_clipping"),
    ("+trainer.foo=1", "trainer.foo"), ("+optimizer.foo=1", "optimizer.foo"), ("+model.depth=3", "model.depth"),
    ("+data.shuffle=false", "data.shuffle"), ("callbacks=early_stopping +callbacks.early_stopping.foo=1", "callbacks.early_stopping.foo"),
    ("+curvature.foo=1", "curvature.foo"), ("logger=csv +logger.csv.foo=1", "logger.csv.foo"),
    ("scheduler=step +scheduler.foo=1", "scheduler.foo"), ("optimizer=adam +optimizer.momentum=0.9", "optimizer.momentum"),
])
def test_unknown_keys_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: unknown config key"):
        validate_config(compose_config(*override.split()))


@pytest.mark.parametrize("override, line", [
    ("optimizer.maximize=maybe", "optimizer.maximize: 'maybe' is not allowed; expected true or false"),
    ("optimizer=rmsprop optimizer.centered=no", "optimizer.centered: 'no' is not allowed; expected true or false"),
    ("optimizer=adam optimizer.amsgrad=2", "optimizer.amsgrad: 2 is not allowed; expected true or false"),
    ("+optimizer.foreach=maybe", "optimizer.foreach: 'maybe' is not allowed; expected null or true or false"),
    ("optimizer.impl=torch optimizer.nesterov=1 optimizer.momentum=0.9",
     "optimizer.nesterov: 1 is not allowed; expected true or false"),
    ("curvature=5", "curvature: 5 is not allowed; expected its keys (curvature.<key>=...)"),
    ("regimes=5", "regimes: 5 is not allowed; expected its keys (regimes.<key>=...)"),
    ("population=5", "population: 5 is not allowed; expected its keys (population.<key>=...)"),
    ("trainer.limit_train_batches=0.0", "trainer.limit_train_batches: 0.0 is not allowed; expected null or an integer "
                                        ">= 1 or a fraction in (0, 1]"),
    ("trainer.limit_val_batches=0.0", "trainer.limit_val_batches: 0.0 is not allowed; expected null or an integer "
                                      ">= 1 or a fraction in (0, 1]"),
    # null, which these rules had allowed and the number rule refused in other words (a review): Lightning's
    # Trainer fails on max_steps=None and would take overfit_batches=None as 100%
    ("trainer.overfit_batches=null", "trainer.overfit_batches: None is not allowed; expected an integer >= 0 or a "
                                     "fraction in [0, 1]"),
    ("+trainer.max_steps=null", "trainer.max_steps: None is not allowed; expected one of -1 (a run stops after whole "
                                "epochs, which the diagnosis judges; use epochs or trainer.limit_train_batches)"),
    # numbers given a bool, text or NaN: true trained with 1.0 (alpha: a blow-up), or crashed mid-run (a probe)
    ("optimizer.weight_decay=true", "optimizer.weight_decay: True is not allowed; expected a finite number"),
    ("optimizer.momentum=true", "optimizer.momentum: True is not allowed; expected a finite number"),
    # torch.optim takes these; in a run they are no optimizer (a probe: each trained, and was diagnosed by its lr)
    ("optimizer=rmsprop optimizer.momentum=1.5", "optimizer.momentum: 1.5 is not allowed; expected a number below 1 "
                                                 "(from 1 up the momentum buffer never decays)"),
    ("optimizer.momentum=0.9 optimizer.dampening=2", "optimizer.dampening: 2 is not allowed; expected a number up to "
                                                     "1 (above 1 each gradient enters the momentum buffer with its "
                                                     "sign flipped: the steps climb the loss)"),
    ("optimizer=adam optimizer.eps=0", "optimizer.eps: 0 is not allowed; expected a number > 0 (with 0, a weight whose "
                                       "gradients have all been 0, e.g. of a pixel that is 0 in every image, is "
                                       "updated by 0 / 0 = NaN)"),
    ("optimizer=rmsprop optimizer.eps=0.0", "optimizer.eps: 0.0 is not allowed; expected a number > 0 (with 0, a "
                                            "weight whose gradients have all been 0, e.g. of a pixel that is 0 in "
                                            "every image, is updated by 0 / 0 = NaN)"),
    # torch.optim's switch, which our optimizers take: a run's leaf parameters failed at the first step (a review)
    ("optimizer=adam +optimizer.differentiable=true", "optimizer.differentiable: True is not allowed; expected false "
                                                      "(a run's parameters are leaf tensors, which a differentiable "
                                                      "step cannot update)"),
    ("optimizer.dampening=abc", "optimizer.dampening: 'abc' is not allowed; expected a finite number"),
    ("optimizer.grad_noise_std=true", "optimizer.grad_noise_std: True is not allowed; expected a finite number"),
    ("optimizer=adam optimizer.eps=true", "optimizer.eps: True is not allowed; expected a finite number"),
    ("optimizer=rmsprop optimizer.alpha=nan", "optimizer.alpha: nan is not allowed; expected a finite number"),
    ("optimizer=adagrad optimizer.initial_accumulator_value=true",
     "optimizer.initial_accumulator_value: True is not allowed; expected a finite number"),
    ("optimizer=adagrad optimizer.lr_decay=false",
     "optimizer.lr_decay: False is not allowed; expected a finite number"),
    ("curvature.tol=1.5", "curvature.tol: 1.5 is not allowed; expected a number in (0, 1)"),  # 52% low (a probe)
    ("trainer.fast_dev_run=-1",
     "trainer.fast_dev_run: -1 is not allowed; expected true, false or a number of batches >= 0"),
    ("model.init_std=[1]", "model.init_std: [1] is not allowed; expected a finite number"),
])
def test_values_no_constructor_checks_are_refused_in_one_line(override: str, line: str) -> None:
    """Flags (torch.optim's constructors take any truthy value: 'no' switched centering on), numbers (a
    bool is one to Python), a group given a plain value, and a zero fraction of batches (no training or no
    validation at all)."""
    with pytest.raises(ConfigError) as refused:
        validate_config(compose_config(*override.split()))
    assert str(refused.value) == line


def test_eps_zero_is_allowed_where_nothing_divides_by_zero() -> None:
    """Adagrad's positive initial accumulator keeps its denominator above 0; SGD's dampening 1 is a momentum
    buffer that keeps its first gradient only (torch's meaning)."""
    validate_config(compose_config("optimizer=adagrad", "optimizer.eps=0", "optimizer.initial_accumulator_value=0.1"))
    validate_config(compose_config("optimizer.momentum=0.99", "optimizer.dampening=1"))
    with pytest.raises(ConfigError, match="^optimizer.eps: 0 is not allowed"):
        validate_config(compose_config("optimizer=adagrad", "optimizer.eps=0"))


@pytest.mark.parametrize("override, line", [
    # deleted (~key) or nulled, each had crashed (ConfigAttributeError), given a multi-line interpolation error,
    # or trained on a default its record did not show (a probe)
    ("~test_ckpt", "test_ckpt: missing; optimlab reads it, so it cannot be deleted: give it a value instead"),
    ("~trainer.precision", "trainer.precision: missing; optimlab reads it, so it cannot be deleted: give it a value "
                           "instead"),
    ("~trainer.flush_denormal", "trainer.flush_denormal: missing; optimlab reads it, so it cannot be deleted: give it "
                                "a value instead"),
    ("~lr", "lr: missing; optimlab reads it, so it cannot be deleted: give it a value instead"),
    ("~optimizer.lr", "optimizer.lr: missing; optimlab reads it, so it cannot be deleted: give it a value instead"),
    ("~data.val_size", "data.val_size: missing; optimlab reads it, so it cannot be deleted: give it a value instead"),
    ("~model.hidden", "model.hidden: missing; optimlab reads it, so it cannot be deleted: give it a value instead"),
    ("model=cnn ~model.channels", "model.channels: missing; optimlab reads it, so it cannot be deleted: give it a "
                                  "value instead"),
    ("~trainer", "trainer: missing; expected its keys (trainer.<key>=...)"),
    ("regimes=null", "regimes: None is not allowed; expected its keys (regimes.<key>=...)"),
    ("~data", "data: missing; choose one of conf/data/"),
    ("~callbacks.model_checkpoint.monitor", "callbacks.model_checkpoint.monitor: missing; best.ckpt keeps the best "
                                            "epoch by it: expected one of val/loss, val/acc"),
    # test_ckpt=best from a checkpoint saved mid-epoch (or never): it had tested the last weights, saying so nowhere
    ("test_ckpt=best +callbacks.model_checkpoint.every_n_train_steps=1",
     "callbacks.model_checkpoint.every_n_train_steps: 1 is not allowed with test_ckpt=best; expected null or 0 (the "
     "best epoch is saved as each epoch's validation ends), or use test_ckpt=last"),
    ("test_ckpt=best +callbacks.model_checkpoint.every_n_epochs=0",
     "callbacks.model_checkpoint.every_n_epochs: 0 is not allowed with test_ckpt=best; expected null or 1 (the best "
     "epoch is saved as each epoch's validation ends), or use test_ckpt=last"),
    ("test_ckpt=best +callbacks.model_checkpoint.every_n_epochs=2",  # epochs=1: no best.ckpt, the last tested
     "callbacks.model_checkpoint.every_n_epochs: 2 is not allowed with test_ckpt=best; expected null or 1 (the best "
     "epoch is saved as each epoch's validation ends), or use test_ckpt=last"),
    # a bad interpolation in a config file of one's own: one line (check_required had raised InterpolationKeyError)
    ("optimizer.lr=${oops}", "optimizer.lr: cannot be resolved (Interpolation key 'oops' not found)"),
])
def test_a_key_the_run_reads_cannot_be_deleted(override: str, line: str) -> None:
    with pytest.raises(ConfigError) as refused:
        validate_config(compose_config(*override.split()))
    assert str(refused.value) == line


def test_a_run_never_replaces_another_runs_files_in_a_folder_set_outside_its_own(tmp_path) -> None:
    """A second run with the same CSV save_dir or checkpoint dirpath had replaced the first's metrics.csv and
    best.ckpt (a probe); it is refused (a run resuming its checkpoint is not checked: its own files are there)."""
    csv = ["logger=csv", f"+logger.csv.save_dir={tmp_path / 'logs'}"]
    ckpt = [f"+callbacks.model_checkpoint.dirpath={tmp_path}"]
    for overrides in (csv, ckpt, [*csv[:1], f"+logger.csv.save_dir={tmp_path}", "logger.csv.version=3"]):
        check_shared_folders(compose_config(*overrides))  # nothing there yet
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("epoch\n")
    (tmp_path / "best.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^logger.csv.save_dir: '.*logs' holds another run's .*metrics.csv, which this "
                                          r"run would replace; choose an empty folder or another logger.csv.version$"):
        check_shared_folders(compose_config(*csv))
    with pytest.raises(ConfigError, match=r"^callbacks.model_checkpoint.dirpath: '.*' holds another run's .*best.ckpt, "
                                          r"which this run would replace"):
        check_shared_folders(compose_config(*ckpt))
    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_3" / "metrics.csv").write_text("epoch\n")
    with pytest.raises(ConfigError, match="version_3/metrics.csv"):
        check_shared_folders(compose_config(*csv[:1], f"+logger.csv.save_dir={tmp_path}", "logger.csv.version=3"))
    check_shared_folders(compose_config(*csv, "logger.csv.version=null"))  # a new version_N of its own
    check_shared_folders(compose_config(*ckpt, "callbacks.model_checkpoint.enable_version_counter=true"))  # best-v1


def test_flags_accept_booleans_and_null_where_null_is_the_default() -> None:
    for override in ("optimizer.maximize=true", "optimizer=adam optimizer.amsgrad=false", "+optimizer.foreach=null",
                     "+optimizer.foreach=true", "trainer.limit_train_batches=0.5", "trainer.overfit_batches=0.0",
                     "optimizer.momentum=0", "optimizer=adam optimizer.eps=1", "trainer.overfit_batches=2",
                     "trainer.fast_dev_run=2"):  # Lightning's n batches (it had been refused as not a bool; a probe)
        validate_config(compose_config(*override.split()))


def python_defaults(cls: type) -> dict:
    return {name: p.default for name, p in inspect.signature(cls).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("group", ["model=mlp", "model=cnn", "data=mnist"])
def test_a_groups_python_defaults_are_its_config_file(group: str) -> None:
    """A class built from a group file, made in Python without its arguments, is the config's default
    (keys both name; tuples as the file's lists)."""
    node = OmegaConf.to_container(compose_config(group)[group.split("=")[0]], resolve=True)
    cls = hydra.utils.get_class(node.pop("_target_"))
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in python_defaults(cls).items()}
    shared = node.keys() & defaults.keys()
    assert len(shared) >= 5 and {k: node[k] for k in shared} == {k: defaults[k] for k in shared}


def test_tracking_and_the_population_launchers_python_defaults_are_the_configs() -> None:
    curvature = compose_config().curvature
    for cls in (SharpnessCallback, MemberSharpness):
        defaults = python_defaults(cls)
        assert {k: curvature[k] for k in ("probe_size", "iters", "tol", "log_spaced_start")} == \
            {k: defaults[k] for k in ("probe_size", "iters", "tol", "log_spaced_start")}
    assert python_defaults(SharpnessTracker)["tol"] == curvature.tol
    launcher, conf = python_defaults(PopulationLauncher), OmegaConf.structured(PopulationLauncherConf)
    population = compose_config().population
    assert [launcher[k] for k in population] == list(population.values())
    assert (launcher["executor"], launcher["max_parallel"]) == (conf.executor, conf.max_parallel)
    assert launcher["submitit"] is None and SUBMITIT_PARAMETERS == OmegaConf.to_container(conf.submitit)


def test_the_configs_diagnosis_thresholds_are_the_python_defaults() -> None:
    """Every threshold is a key under ``regimes`` (``regimes.fit_acc=0.95`` without ``+``) with Thresholds' default."""
    assert OmegaConf.to_container(compose_config().regimes) == dataclasses.asdict(Thresholds())


def test_a_number_parameter_that_also_takes_a_list_or_text_is_left_to_its_class() -> None:
    from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau

    from optimlab.validate import parameter_rule

    for cls, name in ((OneCycleLR, "max_momentum"), (OneCycleLR, "base_momentum"), (ReduceLROnPlateau, "min_lr")):
        assert parameter_rule(inspect.signature(cls).parameters[name]) is None, name  # float | list[float]
    assert parameter_rule(inspect.signature(OneCycleLR).parameters["div_factor"]) is not None


def test_an_int_parameter_is_an_integer_only_for_optimlabs_own_classes() -> None:
    """torch converts CyclicLR's ``step_size_up=2e3`` (a float as Hydra reads it) itself; the CNN's kernel size
    is ours, where ``[3,3]`` was refused as "a number" (a review: the integer rule had covered torch's too)."""
    from torch.optim.lr_scheduler import CyclicLR

    from optimlab.models import CNN
    from optimlab.validate import parameter_rule, validate_config

    step = inspect.signature(CyclicLR).parameters["step_size_up"]
    assert parameter_rule(step)[0](2000.0) and not parameter_rule(step, own=True)[0](2000.0)
    validate_config(compose_config("+scheduler._target_=torch.optim.lr_scheduler.CyclicLR", "+scheduler.base_lr=0.01",
                                   "+scheduler.max_lr=0.1", "+scheduler.step_size_up=2e3"))
    assert parameter_rule(inspect.signature(CNN).parameters["kernel_size"], own=True)[1] == "an integer"


def test_a_parameter_wider_than_a_bool_is_no_flag() -> None:
    """A bool default under a wider annotation (log_model: 'all' too) takes its other values; a bool parameter does not."""
    wandb = OmegaConf.create({"_target_": "lightning.pytorch.loggers.WandbLogger", "log_model": "all"})
    assert parameter_errors("logger.wandb", wandb) == []
    tensorboard = OmegaConf.create({"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "log_graph": "all"})
    assert parameter_errors("logger.tensorboard", tensorboard) == [
        "logger.tensorboard.log_graph: 'all' is not allowed; expected true or false"]


def test_a_model_class_of_ones_own_needs_no_widths_and_a_recorded_config_no_later_keys(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The widths check is for optimlab's MLP and CNN, by whatever path (a review: mymodels.CNN with filters had
    been refused, and optimlab.models.mlp.MLP let through); a resumed run's recorded config is checked without
    today's keys (complete=False) nor the checkpoint cadence test_ckpt=best asks for since."""
    (tmp_path / "mymodels.py").write_text("import torch\n\nclass CNN(torch.nn.Module):\n"
                                          "    def __init__(self, filters=(8,)):\n        super().__init__()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    validate_config(compose_config("model._target_=mymodels.CNN", "~model.hidden", "+model.filters=[8]",
                                   "~model.activation", "~model.init", "~model.init_std", "~model.dropout"))
    with pytest.raises(ConfigError, match="^model.hidden: missing"):
        validate_config(compose_config("model._target_=optimlab.models.mlp.MLP", "~model.hidden"))
    recorded = compose_config("test_ckpt=best", "+callbacks.model_checkpoint.every_n_epochs=2")
    with pytest.raises(ConfigError, match="^callbacks.model_checkpoint.every_n_epochs: 2 is not allowed"):
        validate_config(recorded)
    validate_config(recorded, complete=False)
    cfg = compose_config()
    validate_config(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.model = {"_target_": "torch.nn.Identity"}  # a constructor of one's own, with no widths
    for section in ("population", "curvature", "regimes"):
        del cfg[section]  # a run recorded before these existed
    with pytest.raises(ConfigError, match="^regimes: missing"):
        validate_config(cfg)
    validate_config(cfg, complete=False)
