"""Build a run's parts from its validated config, once: model, optimizer, scheduler, data module,
divergence guard, diagnosis thresholds, and the Lightning Trainer.

The constructors check their own arguments; :func:`build_parts` turns their errors into one-line
:class:`~optimlab.validate.ConfigError` messages naming the config key.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from optimlab.checkpointing import CHECKPOINT_DIR, LAST, AtomicCheckpointIO
from optimlab.console import EpochBar
from optimlab.data import MNISTDataModule
from optimlab.divergence import DivergenceGuard
from optimlab.module import ClassifierModule
from optimlab.regimes import Thresholds
from optimlab.validate import ConfigError


@dataclass
class Parts:
    module: ClassifierModule
    datamodule: MNISTDataModule
    thresholds: Thresholds


# Keys torch's messages call by another name ("Invalid learning rate: ...", "Invalid epsilon value").
MESSAGE_WORDS = {"lr": r"(?:lr|learning rate)", "eps": r"(?:eps|epsilon)"}


@contextlib.contextmanager
def config_errors(section: str, node: DictConfig | None = None) -> Iterator[None]:
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
        where = f"{section}.{key}: {OmegaConf.to_object(node)[key]!r}" if key else section
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


def build_parts(cfg: DictConfig) -> Parts:
    """Everything the run trains, from a validated config. Seed first: the model's init draws."""
    with config_errors("model", cfg.model):
        model = instantiate(cfg.model)
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
    module = ClassifierModule(model, optimizer, scheduler, guard, check_weights_every_n_steps=cfg.trainer.log_every_n_steps)
    thresholds = Thresholds.from_overrides(OmegaConf.to_container(cfg.regimes) if cfg.get("regimes") else {})
    return Parts(module, datamodule, thresholds)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback]) -> L.Trainer:
    """The Lightning Trainer with ``callbacks`` first, then the two checkpoints: the best by
    ``early_stopping.monitor`` and every finished epoch (ModelCheckpoint's own ``save_last`` only
    writes when the monitored value improved, which would leave "last" behind)."""
    t, es = cfg.trainer, cfg.early_stopping
    checkpoints = [ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename=name, monitor=monitor, mode=es.mode,
                                   save_top_k=1, save_on_train_epoch_end=True, auto_insert_metric_name=False,
                                   enable_version_counter=False)
                   for name, monitor in (("best", es.monitor), (LAST.removesuffix(".ckpt"), None))]
    callbacks = [*callbacks, *checkpoints]
    if es.enabled:
        callbacks.append(EarlyStopping(monitor=es.monitor, mode=es.mode, patience=es.patience, min_delta=es.min_delta))
    show_bar = t.progress_bar and sys.stderr.isatty()
    if show_bar:
        callbacks.append(EpochBar(refresh_rate=20))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, precision=t.precision, deterministic=t.deterministic,
        max_epochs=cfg.epochs, log_every_n_steps=t.log_every_n_steps, fast_dev_run=t.fast_dev_run,
        limit_train_batches=t.limit_train_batches, num_sanity_val_steps=0, enable_model_summary=False,
        enable_progress_bar=show_bar, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False),
        default_root_dir=str(run_dir),
    )
