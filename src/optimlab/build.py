"""Build a run's parts from its validated config, once: model, optimizer, scheduler, data module,
divergence guard, diagnosis thresholds, and the Lightning Trainer with its loggers and callbacks.

The constructors check their own arguments; :func:`build_parts` turns their errors into one-line
:class:`~optimlab.validate.ConfigError` messages naming the config key.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import Container, DictConfig, OmegaConf

from optimlab.checkpointing import CHECKPOINT_DIR, LAST, AtomicCheckpointIO
from optimlab.data import MNISTDataModule
from optimlab.divergence import DivergenceGuard
from optimlab.module import ClassifierModule
from optimlab.regimes import Thresholds
from optimlab.tensorboard_logger import Restart, in_run_folder
from optimlab.validate import OWN_TRAINER_KEYS, ConfigError, weight_dtype

CLIPPING = ("gradient_clip_val", "gradient_clip_algorithm")  # trainer keys the module applies (manual optimization)


@dataclass
class Parts:
    module: ClassifierModule
    datamodule: MNISTDataModule
    thresholds: Thresholds


# Keys torch's messages call by another name ("Invalid learning rate: ...", "Invalid epsilon value").
MESSAGE_WORDS = {"lr": r"(?:lr|learning rate)", "eps": r"(?:eps|epsilon)"}


@contextlib.contextmanager
def config_errors(section: str, node: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Turn a constructor's error into a ConfigError naming ``section.<key>`` (the section's key
    the message mentions first) and the value."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        while err.__cause__ is not None:  # hydra's instantiate wraps the real error
            err = err.__cause__
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        asked = re.search(r"allocate (\d+) bytes", message)  # torch's CPU allocator's words
        if asked or isinstance(err, (MemoryError, torch.OutOfMemoryError)):
            size = f": it asked for {int(asked[1]) / 2**30:,.1f} GiB at once" if asked else f" ({message})"
            raise ConfigError(f"{section}: does not fit in memory{size}") from None
        if message.startswith(f"{section}."):
            raise ConfigError(message) from None
        # The message's subject comes first ("Nesterov momentum requires a momentum ..." is about nesterov).
        found = {}
        for key in (node or {}):
            word = MESSAGE_WORDS.get(str(key), re.escape(str(key).rstrip("s")))
            match = re.search(rf"\b{word}s?\b", message, re.IGNORECASE)
            if match and not str(key).startswith("_"):
                found[str(key)] = match.start()
        key = min(found, key=found.get) if found else None
        value = node[key] if key else None
        where = f"{section}.{key}: {OmegaConf.to_object(value) if isinstance(value, Container) else value!r}" \
            if key else section
        raise ConfigError(f"{where}: {message}") from None


def optimizer_class(cfg: DictConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The optimizer class and its keyword arguments. ``impl: torch`` swaps in torch.optim's class of
    the same name with the same hyperparameters, for run-against-run comparisons."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    target, impl = kwargs.pop("_target_"), kwargs.pop("impl", "custom")
    kwargs.pop("_partial_", None)
    if impl == "torch":
        target = "torch.optim." + target.rsplit(".", 1)[1]
        kwargs.pop("grad_noise_std", None)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return get_class(target), kwargs


def set_torch_options(trainer: DictConfig) -> None:
    """The process-wide torch settings of ``trainer.flush_denormal`` and ``trainer.num_threads``."""
    torch.set_flush_denormal(trainer.flush_denormal)
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)


def build_parts(cfg: DictConfig) -> Parts:
    """Everything the run trains, from a validated config. Seed first: the model's init draws."""
    with config_errors("model", cfg.model):
        model = instantiate(cfg.model)
    if (dtype := weight_dtype(cfg.trainer.precision)) != torch.float32:
        # The cast Lightning makes at fit start, made first: an optimizer that creates its state at
        # construction (Adagrad's sum) creates it in the weights' dtype, not float32.
        model.to(dtype)
    if cfg.trainer.compile:
        model.compile()  # in place: checkpoints keep the plain module's parameter names
    with config_errors("optimizer", cfg.optimizer):
        cls, kwargs = optimizer_class(cfg.optimizer)
        optimizer = cls(model.parameters(), **kwargs)
    scheduler = None
    if cfg.get("scheduler"):
        with config_errors("scheduler", cfg.scheduler):
            scheduler = instantiate(cfg.scheduler)(optimizer)
    with config_errors("data", cfg.data):
        datamodule = instantiate(cfg.data)
    guard = DivergenceGuard(cfg.trainer.check_finite_every_n_steps)
    clipping = {key: cfg.trainer.get(key) for key in CLIPPING}
    module = ClassifierModule(model, optimizer, scheduler, guard,
                              check_weights_every_n_steps=cfg.trainer.log_every_n_steps, **clipping)
    thresholds = Thresholds.from_overrides(cfg.get("regimes"))
    return Parts(module, datamodule, thresholds)


def logger_constructors(logger_config: Mapping[str, Any]) -> dict[str, functools.partial]:
    """Each entry of a ``logger`` config as its class with the entry's arguments, to be called with the
    run's ``save_dir`` (Hydra's instantiate costs 1.7 ms a logger, the call 0.06 ms: a population makes
    these once for its members)."""
    return {name: instantiate(entry, _partial_=True) for name, entry in logger_config.items() if entry}


def build_loggers(logger_config: Mapping[str, Any], run_dir: Path, tensorboard_queue: int | None = None,
                  constructors: dict[str, functools.partial] | None = None,
                  restart: Restart | None = None) -> list[Logger]:
    """One logger per entry of the ``logger`` config (``constructors``: its :func:`logger_constructors`,
    made beforehand), each writing under ``<run dir>/<entry name>`` unless its ``save_dir`` is set.
    ``tensorboard_queue``: events a TensorBoard logger's writer holds before it writes them (when all of a
    run's events are written at once). ``restart``: where a TensorBoard logger writing in the run's folder
    takes its events over from an earlier session's (its ``purge_step``; the run then opens it with
    :func:`~optimlab.tensorboard_logger.open_after`)."""
    loggers = []
    for name, entry in logger_config.items():
        if entry:
            with config_errors(f"logger.{name}", entry):
                make = constructors[name] if constructors else instantiate(entry, _partial_=True)
                options = {} if make.keywords.get("save_dir") else {"save_dir": str(run_dir / name)}
                if issubclass(make.func, TensorBoardLogger):
                    if tensorboard_queue:
                        options["max_queue"] = tensorboard_queue
                    save_dir = options.get("save_dir") or make.keywords["save_dir"]
                    if restart is not None and in_run_folder(save_dir, run_dir):
                        options["purge_step"] = restart.step
                loggers.append(make(**options))
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path, loggers: list[Logger]) -> list[L.Callback]:
    """The ``callbacks`` entries; a ModelCheckpoint writes into ``<run dir>/checkpoints`` unless its
    ``dirpath`` is set. A progress bar is kept only on a terminal with ``trainer.progress_bar``, a
    learning-rate monitor only with a logger (it has nowhere else to write)."""
    show_bar = cfg.trainer.progress_bar and sys.stderr.isatty()
    callbacks = []
    for name, entry in (cfg.get("callbacks") or {}).items():
        if not entry:
            continue
        with config_errors(f"callbacks.{name}", entry):
            callback = instantiate(entry)
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(run_dir / CHECKPOINT_DIR)
        if (isinstance(callback, ProgressBar) and not show_bar) or (isinstance(callback, LearningRateMonitor)
                                                                     and not loggers):
            continue
        callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback],
                  restart: Restart | None = None) -> L.Trainer:
    """``lightning.Trainer`` from ``cfg.trainer`` (less optimlab's own keys and gradient clipping,
    which the module applies itself), with the run's ``callbacks`` first, then the configured ones,
    then checkpoints/last.ckpt after every finished epoch (ModelCheckpoint's own ``save_last``
    only writes when the monitored value improved, which would leave "last" behind); ``restart``:
    see :func:`build_loggers`."""
    args = {key: value for key, value in OmegaConf.to_container(cfg.trainer, resolve=True).items()
            if key not in (*OWN_TRAINER_KEYS, *CLIPPING)}
    loggers = build_loggers(cfg.get("logger") or {}, run_dir, restart=restart)
    last = ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename=LAST.removesuffix(".ckpt"), save_top_k=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks = [*callbacks, *build_callbacks(cfg, run_dir, loggers), last]
    with config_errors("trainer", cfg.trainer):
        return instantiate(args, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()],
                           enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
                           num_sanity_val_steps=0, default_root_dir=str(run_dir))
