"""Every experiment and sweep config composes, validates and builds."""

from __future__ import annotations

import pytest

from conftest import CONF, compose_config
from optimlab.train import build_module, check_buildable
from optimlab.validate import validate_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))


def test_the_regime_experiments_exist() -> None:
    assert {"baseline", "slow", "oscillating", "diverging", "underfit", "overfit", "overfit_small", "cnn",
            "grad_noise", "large_batch", "overfit_early_stop", "overfit_l2"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_validates_and_builds(name: str) -> None:
    cfg = compose_config(f"experiment={name}")
    assert cfg.name == name
    validate_config(cfg)
    check_buildable(cfg)
    assert build_module(cfg).model is not None


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_composes(name: str) -> None:
    cfg = compose_config(f"sweep={name}")
    validate_config(cfg)


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
