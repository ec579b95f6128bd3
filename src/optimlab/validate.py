"""Check a composed config before any work starts: one line naming the key, the value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from optimlab.models.activations import ACTIVATIONS
from optimlab.models.init import INITS
from optimlab.regimes import Thresholds


_ABSENT = object()


class ConfigError(Exception):
    """A config value is not allowed; the message is one line for the user."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Rules: (predicate, what is allowed).
POSITIVE = (lambda v: _number(v) and v > 0, "a positive number")
NON_NEGATIVE = (lambda v: _number(v) and v >= 0, "a number >= 0")
UNIT_OPEN = (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)")
UNIT_CLOSED = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
INT_POSITIVE = (lambda v: _integer(v) and v >= 1, "an integer >= 1")
INT_NON_NEGATIVE = (lambda v: _integer(v) and v >= 0, "an integer >= 0")
INT = (_integer, "an integer")
BOOL = (lambda v: isinstance(v, bool), "true or false")
WIDTHS = (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_integer(w) and w >= 1 for w in v),
          "a non-empty list of positive integers, e.g. [1024,128]")
WIDTHS_OR_EMPTY = (lambda v: isinstance(v, (list, tuple)) and all(_integer(w) and w >= 1 for w in v),
                   "a list of positive integers (may be empty)")
BETAS = (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
         "a pair of numbers in [0, 1), e.g. [0.9,0.999]")


def one_of(*choices: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def optional(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or rule[0](v), f"null or {rule[1]}")


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": POSITIVE, "epochs": INT_NON_NEGATIVE, "batch_size": INT_POSITIVE, "seed": INT,
    "test_ckpt": one_of("last", "best"),
    "early_stopping.enabled": BOOL, "early_stopping.patience": INT_NON_NEGATIVE,
    "early_stopping.min_delta": NON_NEGATIVE, "early_stopping.mode": one_of("min", "max"),
    "early_stopping.monitor": one_of("val/loss", "val/acc"),
    "optimizer.impl": one_of("custom", "torch"),
    "optimizer.lr": POSITIVE, "optimizer.momentum": NON_NEGATIVE, "optimizer.dampening": NON_NEGATIVE,
    "optimizer.weight_decay": NON_NEGATIVE, "optimizer.eps": NON_NEGATIVE, "optimizer.betas": BETAS,
    "optimizer.alpha": UNIT_CLOSED, "optimizer.lr_decay": NON_NEGATIVE,
    "optimizer.initial_accumulator_value": NON_NEGATIVE, "optimizer.grad_noise_std": NON_NEGATIVE,
    "optimizer.nesterov": BOOL, "optimizer.amsgrad": BOOL, "optimizer.centered": BOOL,
    "optimizer.maximize": BOOL, "optimizer.decoupled_weight_decay": BOOL,
    "model.hidden": WIDTHS, "model.channels": WIDTHS, "model.fc": WIDTHS_OR_EMPTY,
    "model.kernel_size": INT_POSITIVE, "model.pool_stride": INT_POSITIVE,
    "model.activation": one_of(*ACTIVATIONS), "model.init": one_of(*INITS), "model.init_std": POSITIVE,
    "model.dropout": UNIT_OPEN,
    "data.val_size": INT_POSITIVE, "data.subset": optional(INT_POSITIVE), "data.label_noise": UNIT_CLOSED,
    "data.eval_batch_size": INT_POSITIVE, "data.download": BOOL, "data.test_every_epoch": BOOL,
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps"), "trainer.devices": INT_POSITIVE,
    "trainer.precision": one_of("32-true", "64-true", "16-mixed", "bf16-mixed", "32", "64"),
    "trainer.deterministic": BOOL, "trainer.log_every_n_steps": INT_POSITIVE,
    "trainer.check_finite_every_n_steps": optional(INT_POSITIVE), "trainer.progress_bar": BOOL,
    "trainer.num_threads": optional(INT_POSITIVE), "trainer.flush_denormal": BOOL, "trainer.compile": BOOL,
    "trainer.limit_train_batches": optional(INT_POSITIVE), "trainer.fast_dev_run": BOOL,
}


def regime_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The ``regimes`` config key as a plain dict of threshold overrides."""
    return OmegaConf.to_container(cfg.regimes) if cfg.get("regimes") else {}


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value that breaks a rule in :data:`RULES`, for a
    resume target that does not exist, and for option combinations that cannot work."""
    for key, (ok, allowed) in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=_ABSENT)
        except Exception as err:  # an interpolation that cannot resolve
            raise ConfigError(f"{key}: cannot be resolved ({err})") from None
        if value is _ABSENT:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_object(value)
        if not ok(value):
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}")
    if cfg.optimizer.get("impl") == "torch" and cfg.optimizer.get("grad_noise_std", 0) > 0:
        raise ConfigError("optimizer.grad_noise_std: gradient noise is an option of optimlab's optimizers "
                          "only; use optimizer.impl=custom")
    if cfg.optimizer.get("nesterov") and (cfg.optimizer.momentum <= 0 or cfg.optimizer.dampening != 0):
        raise ConfigError("optimizer.nesterov: true needs optimizer.momentum > 0 and optimizer.dampening=0")
    try:
        Thresholds.from_overrides(regime_overrides(cfg))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    resume = cfg.get("resume")
    if resume not in (None, "auto") and not Path(str(resume)).exists():
        raise ConfigError(f"resume: {resume!r} does not exist; give a run directory, a .ckpt file or 'auto'")

