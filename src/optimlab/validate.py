"""Check a composed config once, before any work: unknown keys, and the values of the keys that
no constructor checks. One line naming the key, the value and what is allowed.

The keys of the instantiated groups (``model``, ``optimizer``, ``data``, ``scheduler``, ``trainer``,
and each entry of ``callbacks`` and ``logger``) are the parameters of their ``_target_``'s
constructor; their values are checked by those constructors when :mod:`optimlab.build` builds them
(the single source for those rules), except where a constructor checks nothing (torch's LR schedulers,
the data module, which reads nothing before setup): those values have rules in :data:`RULES`, as has
every key outside these groups; and the types of the constructors' flags and numbers, which they
do not check (:func:`parameter_rule`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import to_absolute_path
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from optimlab.checks import (BOOL, INTEGER, INT_NON_NEGATIVE, INT_POSITIVE, NON_NEGATIVE, NUMBER, POSITIVE, SEED,
                             UNIT_CLOSED, Rule, finite_number, is_integer, limit, one_of, optional, refusal)
from optimlab.files import read_error, unwritable
from optimlab.regimes import Thresholds
from optimlab.summary import COLLECTIONS, OPTIMIZED_METRICS


class ConfigError(Exception):
    """A config value is not allowed; the message is one line for the user."""


class FolderInUse(ConfigError):
    """A run's folder is one another process runs in now: refused, and nothing written there (not even the
    record of the refusal, which would be that run's)."""


PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "32", "64")  # trainer.precision's values


MONITORED = one_of("val/loss", "val/acc")
BETTER = {"val/loss": "min", "val/acc": "max"}  # the mode each monitored metric improves in
LOGGER_PACKAGES = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}  # loggers whose package is optional
ONE_DEVICE = "the in-memory batches are not sharded per rank; run jobs in parallel with a sweep instead"

# Every key outside the instantiated groups, with its rule; a key not listed is unknown.
RULES: dict[str, Rule] = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "lr": POSITIVE, "epochs": INT_POSITIVE, "batch_size": INT_POSITIVE, "seed": SEED,
    "resume": optional((lambda v: isinstance(v, str) and v.strip() != "", "a run directory, a .ckpt file or 'auto'")),
    "test_ckpt": one_of("last", "best"), "optimized_metric": one_of(*OPTIMIZED_METRICS),
    # Lightning's Trainer checks most of its own arguments when it is built; these it checks late
    # (mid-run) or not at all, or optimlab cannot honour other values.
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps"), "trainer.devices": one_of(1),
    "trainer.num_nodes": one_of(1), "trainer.strategy": one_of("auto"),
    "trainer.precision": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool) and str(v) in PRECISIONS,
                          "one of " + ", ".join(PRECISIONS)),  # 64 as Hydra reads it too, an integer; see weight_dtype
    "trainer.deterministic": BOOL, "trainer.log_every_n_steps": INT_POSITIVE, "trainer.max_epochs": INT_POSITIVE,
    "trainer.gradient_clip_val": optional(NON_NEGATIVE),
    "trainer.gradient_clip_algorithm": optional(one_of("norm", "value")),
    "trainer.accumulate_grad_batches": one_of(1), "trainer.check_val_every_n_epoch": one_of(1),
    "trainer.val_check_interval": optional(one_of(1.0)), "trainer.barebones": one_of(False),
    "trainer.max_steps": one_of(-1), "trainer.max_time": one_of(None),
    "trainer.limit_train_batches": optional(limit(1)), "trainer.limit_val_batches": optional(limit(1)),
    "trainer.limit_test_batches": optional(limit(1)),
    "trainer.overfit_batches": limit(0),  # Lightning would take null as 100%
    "trainer.fast_dev_run": (lambda v: isinstance(v, bool) or (is_integer(v) and v >= 0),
                             "true, false or a number of batches >= 0"),
    "trainer.profiler": optional(one_of("simple", "advanced", "pytorch")),
    "trainer.detect_anomaly": BOOL,
    # optimlab's own trainer keys (OWN_TRAINER_KEYS)
    "trainer.check_finite_every_n_steps": optional(INT_POSITIVE), "trainer.progress_bar": BOOL,
    "trainer.num_threads": optional(INT_POSITIVE), "trainer.flush_denormal": BOOL, "trainer.compile": BOOL,
    # Lightning checks these only when the first validation ends.
    "callbacks.model_checkpoint.monitor": MONITORED, "callbacks.model_checkpoint.mode": one_of("min", "max"),
    "callbacks.early_stopping.monitor": MONITORED, "callbacks.early_stopping.mode": one_of("min", "max"),
    "callbacks.early_stopping.patience": INT_NON_NEGATIVE, "callbacks.early_stopping.min_delta": NON_NEGATIVE,
    # The data module's own arguments: it reads nothing until setup, so they are checked here.
    "data.val_size": INT_POSITIVE, "data.subset": optional(INT_POSITIVE), "data.label_noise": UNIT_CLOSED,
    "data.batch_size": INT_POSITIVE, "data.eval_batch_size": INT_POSITIVE, "data.download": BOOL,
    "data.test_every_epoch": BOOL, "data.seed": SEED, "data.root": optional((lambda v: isinstance(v, str), "a folder")),
    "optimizer.impl": one_of("custom", "torch"), "optimizer.lr": POSITIVE,
    # A differentiable step updates tensors autograd tracks (meta-learning); a run's parameters are leaves it cannot.
    "optimizer.differentiable": (lambda v: v is False, "false (a run's parameters are leaf tensors, which a "
                                 "differentiable step cannot update)"),
    # torch.optim takes any momentum and dampening >= 0 (what is below 0, or no number, its constructors refuse)
    "optimizer.momentum": (lambda v: not (finite_number(v) and v >= 1),
                           "a number below 1 (from 1 up the momentum buffer never decays)"),
    "optimizer.dampening": (lambda v: not (finite_number(v) and v > 1),
                            "a number up to 1 (above 1 each gradient enters the momentum buffer with its sign flipped: "
                            "the steps climb the loss)"),
    # the constructors unpack it first: a number failed as "'float' object is not iterable"
    "optimizer.betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(map(finite_number, v)),
                        "a pair of numbers [beta1, beta2]"),
    # torch's LR schedulers do not check their arguments (StepLR(step_size=0) fails mid-run).
    "scheduler.step_size": INT_POSITIVE, "scheduler.gamma": POSITIVE, "scheduler.T_max": INT_POSITIVE,
    "scheduler.last_epoch": one_of(-1),
    "scheduler.eta_min": NON_NEGATIVE,
    "curvature.every_n_steps": optional(INT_POSITIVE), "curvature.probe_size": INT_POSITIVE,
    "curvature.iters": (lambda v: is_integer(v) and v >= 2, "an integer >= 2"),
    "curvature.tol": (lambda v: finite_number(v) and 0 < v < 1, "a number in (0, 1)"),  # a relative error bound
    "curvature.log_spaced_start": BOOL,
    # read by hydra/launcher=population (hydra.launcher.max_members / ...), which also checks them
    "population.max_members": INT_POSITIVE, "population.max_memory_gib": optional(POSITIVE), "population.dry_run": BOOL,
}
# Keys optimlab reads itself, each set in conf/ (null for some): deleted (~key) or left out of a config file of
# one's own, the run would stop on it mid-way or take a default its record does not show. The sections must be
# mappings (regimes=null would record no thresholds).
REQUIRED = ("name", "lr", "epochs", "batch_size", "seed", "resume", "test_ckpt", "optimized_metric", "optimizer.lr",
            "trainer.accelerator", "trainer.precision", "trainer.max_epochs", "trainer.log_every_n_steps",
            "trainer.progress_bar", "trainer.flush_denormal", "trainer.compile", "trainer.check_finite_every_n_steps",
            "trainer.num_threads", "data.root", "data.subset", "curvature.every_n_steps", "population.max_memory_gib",
            "data.val_size", "data.label_noise", "data.batch_size", "data.eval_batch_size", "data.seed",
            "data.download", "data.test_every_epoch", "curvature.probe_size", "curvature.iters", "curvature.tol",
            "curvature.log_spaced_start", "population.max_members", "population.dry_run")
SECTIONS = ("trainer", "regimes", "curvature", "population")
# Why a value is refused although the rule's type fits: the message's second half.
WHY = {"trainer.devices": ONE_DEVICE, "trainer.num_nodes": ONE_DEVICE, "trainer.strategy": ONE_DEVICE,
       "trainer.accumulate_grad_batches": "optimlab steps once per batch, after its non-finite check; "
                                          "raise batch_size instead",
       "trainer.check_val_every_n_epoch": "the run record and the diagnosis need a validation point per epoch",
       "trainer.val_check_interval": "the run record and the diagnosis need one validation point per epoch",
       "trainer.barebones": "the run record is a callback",
       "scheduler.last_epoch": "a run's scheduler starts at its first epoch; resume=<run dir> continues one",
       "curvature.iters": "one product only measures the warm start vector, which then never improves",
       "trainer.max_steps": "a run stops after whole epochs, which the diagnosis judges; "
                            "use epochs or trainer.limit_train_batches",
       "trainer.max_time": "a run stops after whole epochs, which the diagnosis judges; use epochs"}
# Trainer arguments optimlab sets itself, and where a user sets what they control.
TRAINER_SET_BY_OPTIMLAB = {
    "logger": "choose logger=<name> (conf/logger/)", "callbacks": "choose callbacks=<name> (conf/callbacks/)",
    "enable_checkpointing": "checkpoints/last.ckpt is always written (resume needs it); "
                            "callbacks.model_checkpoint is best.ckpt",
    "enable_progress_bar": "use trainer.progress_bar", "default_root_dir": "use hydra.run.dir",
    "plugins": "optimlab writes checkpoints with its own atomic writer",
    "num_sanity_val_steps": "optimlab validates after every epoch and never before training"}
# The precisions (of those allowed) under which Lightning casts the module's weights, and to what; under
# the others (32-true and the mixed ones) they stay float32.
WEIGHT_DTYPES = {"64-true": torch.float64, "64": torch.float64}
OWN_TRAINER_KEYS = ("check_finite_every_n_steps", "progress_bar", "num_threads", "flush_denormal", "compile")
BUILT = ("model", "optimizer", "data", "scheduler")   # groups instantiated from their _target_
COLLECTION_CLASSES = {"callbacks": L.Callback, "logger": Logger}  # what each entry must build
# Arguments a class takes without checking them (CSVLogger divides by its flush cadence mid-run).
CLASS_RULES: dict[type, dict[str, Rule]] = {CSVLogger: {"flush_logs_every_n_steps": INT_POSITIVE}}
GROUPS = (*SECTIONS, *BUILT, *COLLECTIONS)
EXTRA_KEYS = {"optimizer": {"impl"}, "trainer": set(OWN_TRAINER_KEYS)}  # ours, removed before the constructor


def import_target(section: str, target: str) -> Any:
    """The object ``target`` names (a module's attribute, ``package.module.Class``); a ConfigError where
    there is none. Hydra's ``get_class`` would log its own lines about the failure first."""
    parts = target.split(".")
    failed = ""  # why a module that is there failed to import
    for split in range(len(parts) - 1, 0, -1):  # the longest module prefix, then attributes (Outer.Inner)
        module = ".".join(parts[:split])
        try:
            found = importlib.import_module(module)
        except Exception as err:  # not a module (a shorter prefix may be), or one that fails to import (said)
            missing = isinstance(err, ModuleNotFoundError) and (err.name == module or module.startswith(f"{err.name}."))
            if not (missing or failed):
                failed = f"; importing {module} failed: {read_error(err)}"
            continue
        try:
            for name in parts[split:]:
                found = getattr(found, name)
        except AttributeError:
            break
        if callable(found):
            return found
        break
    raise ConfigError(f"{section}._target_: cannot import {target!r} (expected a class or function){failed}")


def constructor_parameters(section: str, target: str) -> dict[str, inspect.Parameter]:
    """The parameters of a ``_target_`` section's constructor a config may set, by name (minus the
    first, positional one of optimizers and schedulers: the parameters and the optimizer)."""
    params = list(inspect.signature(import_target(section, target)).parameters.values())
    if section in ("optimizer", "scheduler"):
        params = params[1:]
    return {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def constructor_keys(section: str, target: str) -> set[str]:
    """The keys a ``_target_`` section may set: its constructor's parameters and ours (:data:`EXTRA_KEYS`)."""
    return set(constructor_parameters(section, target)) | {"_target_", "_partial_"} | EXTRA_KEYS.get(section, set())


def _target_keys(section: str, node: DictConfig) -> list[str]:
    """The keys of an instantiated ``section`` that its ``_target_`` does not take."""
    if "_target_" not in node:
        raise ConfigError(f"{section}._target_: missing; choose one of conf/{section.split('.')[0]}/")
    kind = COLLECTION_CLASSES.get(section.split(".")[0])
    target = import_target(section, str(node._target_))
    if kind is not None and not (isinstance(target, type) and issubclass(target, kind)):
        raise ConfigError(refusal(f"{section}._target_", str(node._target_), f"a {kind.__module__.split('.')[0]} "
                                  f"{kind.__name__} class (see conf/{section.split('.')[0]}/)"))
    allowed = constructor_keys(section, str(node._target_))
    return [f"{section}.{key}" for key in node if key not in allowed]


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys of ``cfg`` that nothing reads (dotted)."""
    top = {key.split(".")[0] for key in RULES} | set(GROUPS)
    unknown = [str(key) for key in cfg if key not in top]
    for section in GROUPS:
        node = cfg.get(section)
        if node is not None and not isinstance(node, DictConfig):  # curvature=5: a group given a value
            raise ConfigError(refusal(section, node, f"its keys ({section}.<key>=...)"))
        if not isinstance(node, DictConfig) or section == "regimes" or (section in BUILT and not node):
            continue  # an empty group (scheduler=none) has nothing to check
        if section == "trainer":
            for key in node:
                if key in TRAINER_SET_BY_OPTIMLAB:
                    raise ConfigError(f"trainer.{key}: set by optimlab; {TRAINER_SET_BY_OPTIMLAB[key]}")
        if section in (*BUILT, "trainer"):
            unknown += _target_keys(section, node)
        elif section in COLLECTIONS:
            for name, entry in node.items():
                if entry is not None:  # callbacks.lr_monitor=null drops one entry
                    if not isinstance(entry, DictConfig):
                        raise ConfigError(refusal(f"{section}.{name}", entry,
                                                  f"an entry with a _target_ (see conf/{section}/) or null"))
                    unknown += _target_keys(f"{section}.{name}", entry)
        else:
            allowed = {key.split(".", 1)[1] for key in RULES if key.startswith(section + ".")}
            unknown += [f"{section}.{key}" for key in node if key not in allowed]
    return unknown


def parameter_rule(param: inspect.Parameter, own: bool = False) -> Rule | None:
    """The type a constructor's parameter takes where the constructor does not check it: :data:`BOOL`
    for a flag (a bool default or annotation; null allowed where null is its default), :data:`INTEGER`
    for one annotated ``int`` of optimlab's ``own`` classes (torch and Lightning convert a float for some of
    theirs: CyclicLR's ``step_size_up=2e3``), :data:`NUMBER` for another with a number as its default (null where
    its annotation allows it; none where it allows text or a list), None for any other. torch.optim's
    constructors take ``optimizer.centered=no`` (a non-empty string) as on, and ``optimizer.momentum=true``
    as 1.0."""
    annotation = param.annotation  # a bool default under a wider type (wandb's log_model: 'all' too) is no flag
    if annotation in (bool, "bool") or (annotation is inspect.Parameter.empty and isinstance(param.default, bool)):
        return BOOL
    if param.default is None and annotation in (Optional[bool], "bool | None", "Optional[bool]"):
        return optional(BOOL)
    wider = ("str", "list", "List", "Sequence", "tuple", "Tuple")  # OneCycleLR's momenta: a number or a list
    if isinstance(param.default, (int, float)) and not isinstance(param.default, bool) and \
            not any(word in str(annotation) for word in wider):
        if own and annotation in (int, "int"):  # a kernel size, a stride
            return INTEGER
        return optional(NUMBER) if "None" in str(annotation) or "Optional" in str(annotation) else NUMBER
    return None


def parameter_errors(section: str, node: DictConfig) -> list[str]:
    """The refusals of the values ``section`` (built from its ``_target_``) gives its flags and numbers
    that are of another type (:func:`parameter_rule`)."""
    params = constructor_parameters(section, str(node._target_))
    return [refusal(f"{section}.{key}", node[key], rule[1]) for key in node
            if key in params and (rule := parameter_rule(params[key], str(node._target_).startswith("optimlab.")))
            and not rule[0](node[key])]


def unchecked_errors(section: str, node: DictConfig) -> list[str]:
    """The refusals of the values of ``section``'s arguments that its class takes unchecked
    (:data:`CLASS_RULES`)."""
    target = import_target(section, str(node._target_))
    return [refusal(f"{section}.{key}", node[key], allowed) for cls, rules in CLASS_RULES.items()
            if isinstance(target, type) and issubclass(target, cls)
            for key, (ok, allowed) in rules.items() if key in node and not ok(node[key])]


def rule_error(key: str, value: Any) -> str | None:
    """The one-line refusal of ``value`` for ``key`` by its rule in :data:`RULES`, or None if allowed."""
    ok, allowed = RULES[key]
    if ok(value):
        return None
    return refusal(key, value, allowed + (f" ({WHY[key]})" if key in WHY else ""))


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True, default=inspect.Parameter.empty)
    except Exception as err:  # an interpolation that cannot resolve
        raise ConfigError(f"{key}: cannot be resolved ({str(err).strip().splitlines()[0]})") from None
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def check_required(cfg: DictConfig) -> None:
    """Every :data:`SECTIONS` a mapping, every :data:`REQUIRED` key present, our models' widths given: a
    command's config holds today's keys."""
    for section in SECTIONS:
        if not isinstance(cfg.get(section), DictConfig):
            keys = f"its keys ({section}.<key>=...)"  # as unknown_keys refuses a plain value
            missing = f"{section}: missing; expected {keys}"
            raise ConfigError(refusal(section, None, keys) if section in cfg else missing)
    from optimlab.models import CNN, MLP  # (imported when first needed: the models import torch's layers)

    target = import_target("model", str(cfg.model._target_)) if cfg.model.get("_target_") else None
    # what the run record names our nets by (their widths); a class of one's own may have none
    widths = ["model.hidden"] if target is MLP else ["model.channels"] if target is CNN else []
    for key in (*REQUIRED, *widths):
        if _value(cfg, key) is inspect.Parameter.empty:
            raise ConfigError(f"{key}: missing; optimlab reads it, so it cannot be deleted: give it a value instead")


def tracks_sharpness(cfg: DictConfig) -> bool:
    """Whether the run tracks its sharpness: ``curvature.every_n_steps`` set (a run recorded before the
    ``curvature`` section existed has none)."""
    return bool((cfg.get("curvature") or {}).get("every_n_steps"))


def validate_config(cfg: DictConfig, complete: bool = True) -> None:
    """Raise :class:`ConfigError` for an unknown key, a value that breaks its rule in :data:`RULES`,
    an option combination that cannot work, or hardware that is not there; with ``complete`` (a command's
    config, not a run's recorded one, which holds the keys of its day) also for a missing key
    (:func:`check_required`)."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: unknown config key{'s' if len(unknown) > 1 else ''} "
                          f"(nothing reads {'them' if len(unknown) > 1 else 'it'}); check the spelling, or see conf/")
    for key in ("model", "optimizer", "data"):
        if not isinstance(cfg.get(key), DictConfig):
            raise ConfigError(f"{key}: missing; choose one of conf/{key}/")
    if complete:
        check_required(cfg)
    for key in RULES:
        value = _value(cfg, key)
        if value is not inspect.Parameter.empty and (error := rule_error(key, value)):
            raise ConfigError(error)
    check_range(cfg)
    built = [(section, cfg.get(section)) for section in (*BUILT, "trainer")]
    built += [(f"{section}.{name}", entry) for section in COLLECTIONS
              for name, entry in (cfg.get(section) or {}).items()]
    for section, node in built:
        if node and (errors := parameter_errors(section, node) + unchecked_errors(section, node)):
            raise ConfigError(errors[0])
    check_epsilon(cfg.optimizer)
    if cfg.optimizer.get("impl") == "torch" and cfg.optimizer.get("grad_noise_std", 0) != 0:
        raise ConfigError("optimizer.grad_noise_std: gradient noise is an option of optimlab's optimizers "
                          "only; use optimizer.impl=custom")
    if tracks_sharpness(cfg) and cfg.optimizer.get("maximize"):
        raise ConfigError("curvature.every_n_steps: the sharpness is tracked against a descent's stability threshold, "
                          "and optimizer.maximize=true climbs the loss (its stability rests on H's lowest eigenvalue); "
                          "set curvature.every_n_steps=null or optimizer.maximize=false")
    try:
        Thresholds.from_overrides(cfg.get("regimes"))
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    check_checkpoint_callbacks(cfg, new=complete)
    check_loggers(cfg)
    _check_hardware(cfg.trainer.accelerator, cfg.trainer.precision)
    if cfg.get("resume") not in (None, "auto"):
        resume_target(cfg.resume)


def check_epsilon(optimizer: DictConfig) -> None:
    """Refuse ``eps`` 0 (torch.optim takes it) where it divides by 0: the first update of a weight whose
    gradients have all been 0 (an MNIST pixel that is 0 in every image) is 0 / 0 = NaN, and the run would read
    as diverged by its lr. Adagrad's positive ``initial_accumulator_value`` keeps its denominator above 0."""
    eps = optimizer.get("eps")
    accumulated = optimizer.get("initial_accumulator_value")
    if finite_number(eps) and eps == 0 and not (finite_number(accumulated) and accumulated > 0):
        raise ConfigError(refusal("optimizer.eps", eps, "a number > 0 (with 0, a weight whose gradients have all been "
                                  "0, e.g. of a pixel that is 0 in every image, is updated by 0 / 0 = NaN)"))


def resume_target(resume: str) -> Path:
    """The run folder or checkpoint ``resume`` names, from the launching folder (also under
    ``hydra.job.chdir``); a ConfigError where there is none."""
    target = Path(to_absolute_path(str(resume)))
    if not target.exists():
        raise ConfigError(f"resume: {resume!r} does not exist; give a run directory, a .ckpt file or 'auto'")
    return target


# ModelCheckpoint's cadences that test_ckpt=best allows (as a population follows them, population/best.py): saves
# mid-epoch would judge the last validation's metric (none came before the first epoch ended), saves every few
# epochs would skip the others (and none before the first save: no best epoch to test).
BEST_CADENCE: dict[str, Rule] = {"every_n_train_steps": (lambda v: not v, "null or 0"),
                                 "train_time_interval": (lambda v: v is None, "null"),
                                 "every_n_epochs": (lambda v: v is None or (is_integer(v) and v == 1), "null or 1")}


def check_checkpoint_callbacks(cfg: DictConfig, new: bool = True) -> None:
    """The best epoch is chosen by a monitor in the direction it improves in, kept in a file of its own
    (``last.ckpt`` is the run's resume point), and, for ``test_ckpt=best``, once: one file to test; for a
    ``new`` run (not one recorded before the rule), after every epoch (:data:`BEST_CADENCE`)."""
    from optimlab.checkpointing import LAST  # which imports this module's ConfigError

    callbacks = cfg.get("callbacks") or {}
    for name, entry in callbacks.items():
        target = import_target(f"callbacks.{name}", str(entry._target_)) if entry else None
        if not (isinstance(target, type) and issubclass(target, (ModelCheckpoint, EarlyStopping))):
            continue
        monitor, mode = entry.get("monitor"), entry.get("mode", "min")  # Lightning's default mode
        if monitor in BETTER and mode in ("min", "max") and mode != BETTER[monitor]:
            raise ConfigError(f"callbacks.{name}.mode: {mode!r} contradicts callbacks.{name}.monitor={monitor} "
                              f"(better when {'lower' if BETTER[monitor] == 'min' else 'higher'}); "
                              f"set callbacks.{name}.mode={BETTER[monitor]}")
    best = callbacks.get("model_checkpoint")
    if best and best.get("monitor") is None:  # null is refused by its rule; deleted, Lightning's error names trainer
        raise ConfigError("callbacks.model_checkpoint.monitor: missing; best.ckpt keeps the best epoch by it: expected "
                          "one of val/loss, val/acc")
    if best and f"{best.get('filename')}.ckpt" == LAST:
        raise ConfigError(f"callbacks.model_checkpoint.filename: {best.get('filename')!r} is not allowed; expected "
                          f"another name than the run's own {LAST}, which resume continues from")
    if cfg.test_ckpt == "best" and not best:
        raise ConfigError("test_ckpt: 'best' needs callbacks.model_checkpoint, which chooses the best epoch; "
                          "use test_ckpt=last or callbacks=default")
    if new and cfg.test_ckpt == "best":
        for key, (saves_each_epoch, allowed) in BEST_CADENCE.items():
            if not saves_each_epoch(best.get(key)):
                raise ConfigError(f"callbacks.model_checkpoint.{key}: {best.get(key)!r} is not allowed with "
                                  f"test_ckpt=best; expected {allowed} (the best epoch is saved as each epoch's "
                                  "validation ends), or use test_ckpt=last")
    if cfg.test_ckpt == "best" and best.get("save_top_k", 1) != 1:
        raise ConfigError(f"callbacks.model_checkpoint.save_top_k: {best.get('save_top_k')!r} is not allowed with "
                          f"test_ckpt=best; expected 1 (one best checkpoint to test), or use test_ckpt=last")


def check_loggers(cfg: DictConfig) -> None:
    """Each logger's package is installed, and it can write where it would: a ``save_dir`` that can be
    made and written, and (CSV, TensorBoard: into ``save_dir/name/version``) a ``name`` and ``version``
    that stay inside it (a ``..`` or an absolute path would put the run's logs outside its folder)."""
    for name, entry in (cfg.get("logger") or {}).items():
        if not entry:
            continue
        package = LOGGER_PACKAGES.get(str(entry.get("_target_")).rsplit(".", 1)[-1])
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"logger.{name}: needs the {package} package, which is not installed "
                              f"(pip install {package}); or choose logger=tensorboard, csv, many or none")
        target = import_target(f"logger.{name}", str(entry._target_))
        folders = isinstance(target, type) and issubclass(target, (CSVLogger, TensorBoardLogger))
        for key in ("name", "version") if folders else ():  # W&B's and MLflow's name a run, not a folder
            value = entry.get(key)
            outside = isinstance(value, str) and (Path(value).is_absolute()
                                                  or os.path.normpath(value).split(os.sep)[0] == "..")
            if outside:
                raise ConfigError(refusal(f"logger.{name}.{key}", value,
                                          "a folder name inside the logger's save_dir (no '..', not absolute)"))
        save_dir = entry.get("save_dir")
        if save_dir and (reason := unwritable(Path(str(save_dir)).absolute())):
            raise ConfigError(f"logger.{name}.save_dir: {str(save_dir)!r} cannot be written ({reason}); "
                              f"choose another folder")


def outside_files(cfg: DictConfig) -> list[tuple[str, Path, str]]:
    """The files a run would write at a fixed path set outside its folder, each with the key that sets it and
    what else to set: a CSV logger's ``metrics.csv`` in ``save_dir/name/version`` (not with ``version: null``:
    CSVLogger numbers a new one), a checkpoint ``dirpath``'s ``<filename>.ckpt`` (with the configs'
    ``enable_version_counter: false``)."""
    files = []
    for name, entry in (cfg.get("logger") or {}).items():
        target = import_target(f"logger.{name}", str(entry._target_)) if entry else None
        if isinstance(target, type) and issubclass(target, CSVLogger) and entry.get("save_dir") \
                and entry.get("version") is not None:
            version = entry.version if isinstance(entry.version, str) else f"version_{entry.version}"
            folder = Path(to_absolute_path(str(entry.save_dir)), str(entry.get("name") or ""), version)
            files.append((f"logger.{name}.save_dir", folder / ExperimentWriter.NAME_METRICS_FILE,
                          f"another logger.{name}.version"))
    best = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if best and best.get("dirpath") and not best.get("enable_version_counter", True):
        files.append(("callbacks.model_checkpoint.dirpath",
                      Path(to_absolute_path(str(best.dirpath)), f"{best.get('filename')}.ckpt"),
                      "no dirpath (the run's own checkpoints/)"))
    return files


def check_shared_folders(cfg: DictConfig) -> None:
    """A new run (not one resuming its checkpoint) does not replace another run's :func:`outside_files`."""
    for key, file, instead in outside_files(cfg):
        if file.exists():
            raise ConfigError(f"{key}: {str(OmegaConf.select(cfg, key))!r} holds another run's {file}, which this run "
                              f"would replace; choose an empty folder or {instead}")


def weight_dtype(precision: str | int) -> torch.dtype:
    """The dtype a run's weights train in under ``trainer.precision``."""
    return WEIGHT_DTYPES.get(str(precision), torch.float32)


def check_range(cfg: DictConfig) -> None:
    """The step size and weight decay must be numbers the weights' dtype can hold: an update by a
    larger one cannot be computed (torch refuses to convert it), where a population's member-wise
    tensor would hold inf; the run would crash, the population's member diverge."""
    dtype = weight_dtype(cfg.trainer.precision)
    largest = torch.finfo(dtype).max
    for key in ("lr", "optimizer.lr", "optimizer.weight_decay"):  # lr first: optimizer.lr is ${lr} by default
        value = _value(cfg, key)
        if finite_number(value) and abs(value) > largest:
            what = f"the largest {str(dtype).removeprefix('torch.')} (trainer.precision={cfg.trainer.precision})"
            raise ConfigError(refusal(key, value, f"at most {largest:.7g}, {what}"))


def _check_hardware(accelerator: str, precision: str) -> None:
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: {accelerator!r} but no CUDA GPU is available; use auto or cpu")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator: 'mps' but MPS is not available; use auto or cpu")
    on_cpu = accelerator == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if precision == "16-mixed" and on_cpu:
        raise ConfigError("trainer.precision: '16-mixed' needs a GPU (on the CPU Lightning would silently use "
                          "bf16-mixed); use 32-true, 64-true or bf16-mixed")
