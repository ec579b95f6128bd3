"""Check a composed config once, before any work: unknown keys, and the values of the keys that
no constructor checks. One line naming the key, the value and what is allowed.

The keys of the instantiated groups (``model``, ``optimizer``, ``data``, ``scheduler``) are the
parameters of their ``_target_``'s constructor; their values are checked by those constructors
when :mod:`optimlab.build` builds them (the single source for those rules), except where a
constructor checks nothing (torch's LR schedulers, the data module, which reads nothing before
setup): those values have rules in :data:`RULES`, as has every key outside these groups.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from optimlab.regimes import Thresholds, finite_number

Rule = tuple[Callable[[Any], bool], str]


class ConfigError(Exception):
    """A config value is not allowed; the message is one line for the user."""


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


POSITIVE: Rule = (lambda v: finite_number(v) and v > 0, "a positive number")
NON_NEGATIVE: Rule = (lambda v: finite_number(v) and v >= 0, "a number >= 0")
UNIT_CLOSED: Rule = (lambda v: finite_number(v) and 0 <= v <= 1, "a number in [0, 1]")
INT_POSITIVE: Rule = (lambda v: _integer(v) and v >= 1, "an integer >= 1")
INT_NON_NEGATIVE: Rule = (lambda v: _integer(v) and v >= 0, "an integer >= 0")
SEED: Rule = (lambda v: _integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")
BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
TEXT: Rule = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
ANY: Rule = (lambda v: True, "anything")


def one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def optional(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v), f"null or {rule[1]}")


# Every key outside the instantiated groups, with its rule; a key not listed is unknown.
RULES: dict[str, Rule] = {
    "name": TEXT, "lr": POSITIVE, "epochs": INT_POSITIVE, "batch_size": INT_POSITIVE, "seed": SEED,
    "resume": optional((lambda v: isinstance(v, str), "a run directory, a .ckpt file or 'auto'")),
    "test_ckpt": one_of("last", "best"),
    "early_stopping.enabled": BOOL, "early_stopping.patience": INT_NON_NEGATIVE,
    "early_stopping.min_delta": NON_NEGATIVE, "early_stopping.mode": one_of("min", "max"),
    "early_stopping.monitor": one_of("val/loss", "val/acc"),
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps"), "trainer.devices": one_of(1),
    "trainer.precision": one_of("32-true", "64-true", "16-mixed", "bf16-mixed", "32", "64"),
    "trainer.deterministic": BOOL, "trainer.log_every_n_steps": INT_POSITIVE,
    "trainer.check_finite_every_n_steps": optional(INT_POSITIVE), "trainer.progress_bar": BOOL,
    "trainer.num_threads": optional(INT_POSITIVE), "trainer.flush_denormal": BOOL, "trainer.compile": BOOL,
    "trainer.limit_train_batches": optional(INT_POSITIVE), "trainer.fast_dev_run": BOOL,
    # The data module's own arguments: it reads nothing until setup, so they are checked here.
    "data.val_size": INT_POSITIVE, "data.subset": optional(INT_POSITIVE), "data.label_noise": UNIT_CLOSED,
    "data.batch_size": INT_POSITIVE, "data.eval_batch_size": INT_POSITIVE, "data.download": BOOL,
    "data.test_every_epoch": BOOL, "data.seed": SEED, "data.root": optional((lambda v: isinstance(v, str), "a folder")),
    "optimizer.impl": one_of("custom", "torch"),
    # torch's LR schedulers do not check their arguments (StepLR(step_size=0) fails mid-run).
    "scheduler.step_size": INT_POSITIVE, "scheduler.gamma": POSITIVE, "scheduler.T_max": INT_POSITIVE,
    "scheduler.eta_min": NON_NEGATIVE,
    "curvature.every_n_steps": optional(INT_POSITIVE), "curvature.probe_size": INT_POSITIVE,
    "curvature.iters": INT_POSITIVE, "curvature.tol": POSITIVE, "curvature.log_spaced_start": BOOL,
}
# Why a value is refused although the rule's type fits: the message's second half.
WHY = {"trainer.devices": "the in-memory batches are not sharded per rank; run jobs in parallel with a sweep instead"}
BUILT = ("model", "optimizer", "data", "scheduler")   # groups instantiated from their _target_
GROUPS = ("early_stopping", "trainer", "regimes", "curvature", *BUILT)
EXTRA_KEYS = {"optimizer": {"impl"}}                  # ours, removed before the constructor is called


def constructor_keys(section: str, target: str) -> set[str]:
    """The keys a ``_target_`` section may set: its constructor's parameters (minus the first,
    positional one of optimizers and schedulers: the parameters and the optimizer)."""
    try:
        cls = get_class(target)
    except Exception:
        raise ConfigError(f"{section}._target_: cannot import {target!r}") from None
    params = list(inspect.signature(cls).parameters.values())
    if section in ("optimizer", "scheduler"):
        params = params[1:]
    return {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} | {"_target_", "_partial_"} \
        | EXTRA_KEYS.get(section, set())


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys of ``cfg`` that nothing reads (dotted)."""
    top = {key.split(".")[0] for key in RULES} | set(GROUPS)
    unknown = [str(key) for key in cfg if key not in top]
    for section in GROUPS:
        node = cfg.get(section)
        if not isinstance(node, DictConfig) or section == "regimes":
            continue
        if section in BUILT:
            if not node:  # an empty group: scheduler=none
                continue
            if "_target_" not in node:
                raise ConfigError(f"{section}._target_: missing; choose one of conf/{section}/")
            allowed = constructor_keys(section, str(node._target_))
        else:
            allowed = {key.split(".", 1)[1] for key in RULES if key.startswith(section + ".")}
        unknown += [f"{section}.{key}" for key in node if key not in allowed]
    return unknown


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True, default=inspect.Parameter.empty)
    except Exception as err:  # an interpolation that cannot resolve
        raise ConfigError(f"{key}: cannot be resolved ({err})") from None
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for an unknown key, a value that breaks its rule in :data:`RULES`,
    an option combination that cannot work, or hardware that is not there."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: unknown config key{'s' if len(unknown) > 1 else ''} "
                          f"(nothing reads {'them' if len(unknown) > 1 else 'it'}); check the spelling, or see conf/")
    for key, (ok, allowed) in RULES.items():
        value = _value(cfg, key)
        if value is not inspect.Parameter.empty and not ok(value):
            why = f" ({WHY[key]})" if key in WHY else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {allowed}{why}")
    for key in ("model", "optimizer", "data"):
        if not isinstance(cfg.get(key), DictConfig):
            raise ConfigError(f"{key}: missing; choose one of conf/{key}/")
    if cfg.optimizer.get("impl") == "torch" and cfg.optimizer.get("grad_noise_std", 0) != 0:
        raise ConfigError("optimizer.grad_noise_std: gradient noise is an option of optimlab's optimizers "
                          "only; use optimizer.impl=custom")
    try:
        Thresholds.from_overrides(OmegaConf.to_container(cfg.regimes) if cfg.get("regimes") else {})
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    _check_hardware(cfg.trainer.accelerator, cfg.trainer.precision)
    resume = cfg.get("resume")
    if resume not in (None, "auto") and not Path(str(resume)).exists():
        raise ConfigError(f"resume: {resume!r} does not exist; give a run directory, a .ckpt file or 'auto'")


def _check_hardware(accelerator: str, precision: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {accelerator!r} but no CUDA GPU is available; use auto or cpu")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator: 'mps' but MPS is not available; use auto or cpu")
    on_cpu = accelerator == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if precision == "16-mixed" and on_cpu:
        raise ConfigError("trainer.precision: '16-mixed' needs a GPU (on the CPU Lightning would silently use "
                          "bf16-mixed); use 32-true, 64-true or bf16-mixed")
