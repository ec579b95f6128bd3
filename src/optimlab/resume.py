"""Where a run starts: a new run, ``resume=auto`` (skip a finished job, continue an interrupted one) or
``resume=<run dir or .ckpt>``; the config it runs (a resumed run's own, recorded one) and the refusals of a
resume that would start over in place or mix two configs in one record."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from optimlab.checkpointing import CHECKPOINT_DIR, LAST, holds_a_run, last_checkpoint, resolve_resume
from optimlab.command_line import RESUME_OVERRIDES, override_keys, resume_ignores
from optimlab.summary import FINISHED, SUMMARY, RunSummary, dotted_value, drop_keys, read_summary
from optimlab.validate import ConfigError, resume_target, rule_error

# What a continued run's config may differ in from the one it recorded: those, and the population
# launcher's plan (which jobs train together).
MAY_DIFFER_ON_RESUME = (*RESUME_OVERRIDES, "population")


def comparable(config: dict[str, Any], also: tuple[str, ...] = ()) -> dict[str, Any]:
    """``config`` (resolved, as a plain dict) without the :data:`MAY_DIFFER_ON_RESUME` keys and ``also``."""
    config = copy.deepcopy(config)
    drop_keys(config, (*MAY_DIFFER_ON_RESUME, *also))
    return config


def sync_epochs(cfg: DictConfig, keys: list[str]) -> None:
    """``epochs`` and ``trainer.max_epochs`` are one setting: the one given on the command line sets
    both (a config composed without overrides has them equal through the interpolation)."""
    given = {key: OmegaConf.select(cfg, key) for key in ("epochs", "trainer.max_epochs") if key in keys}
    if len(set(given.values())) > 1:
        raise ConfigError(f"trainer.max_epochs: {given['trainer.max_epochs']!r} contradicts epochs: "
                          f"{given['epochs']!r}; they are one setting, give one of them")
    if any(rule_error(key, OmegaConf.select(cfg, key)) for key in ("epochs", "trainer.max_epochs")):
        return  # validation names the bad key and value as given
    with open_dict(cfg):
        cfg.epochs = cfg.trainer.max_epochs = next(iter(given.values()), cfg.trainer.max_epochs)


def recorded_config(config: dict[str, Any], current: DictConfig) -> DictConfig:
    """A run's saved config, brought up to today's keys: a run recorded before the Trainer, callbacks
    and logger came from config (2026-12-03) gets today's defaults for them, and its early-stopping
    settings move to ``callbacks.early_stopping``."""
    config = dict(config)
    early = config.pop("early_stopping", None)
    for key in ("callbacks", "logger", "optimized_metric"):
        if key not in config and key in current:
            value = current[key]
            config[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if "_target_" not in config.get("trainer", {}):
        config["trainer"] = {**OmegaConf.to_container(current.trainer), **config.get("trainer", {}),
                             "max_epochs": config.get("epochs")}
    if early:  # its monitor and mode chose best.ckpt, enabled or not
        best = {"monitor": early["monitor"], "mode": early["mode"]}
        callbacks = config["callbacks"] = dict(config["callbacks"])
        callbacks["model_checkpoint"] = {**callbacks["model_checkpoint"], **best}
        if early.get("enabled"):
            callbacks["early_stopping"] = {"_target_": "lightning.pytorch.callbacks.EarlyStopping", **best,
                                           "patience": early["patience"], "min_delta": early["min_delta"]}
    return OmegaConf.create(config)


def plan_run(
    cfg: DictConfig, run_dir: Path, overrides: list[str]
) -> tuple[DictConfig, Path, Path | None, RunSummary | None]:
    """(config to run, run dir, checkpoint to resume from, the run's summary so far) for a new run,
    ``resume=auto`` or ``resume=<run dir or ckpt>``; refuses to overwrite a run."""
    keys = override_keys(overrides)
    if not cfg.resume or cfg.resume == "auto":
        sync_epochs(cfg, keys)
    if cfg.resume == "auto":
        ckpt, saved = last_checkpoint(run_dir), read_summary(run_dir)
        if saved is None and ckpt is None and (run_dir / SUMMARY).exists():  # a run's, maybe: not overwritten
            raise ConfigError(f"resume=auto: {run_dir / SUMMARY} cannot be read as a run's summary, and there is no "
                              f"checkpoint to continue from; move it away to train anew there, or choose another "
                              f"folder; nothing was changed")
        if saved is not None and saved.status not in FINISHED:  # a finished run is skipped
            refuse_starting_over(run_dir, ckpt, saved)
        return cfg, run_dir, ckpt, saved
    if cfg.resume:
        run_dir, ckpt = resolve_resume(resume_target(cfg.resume))  # a path that is no run: said first
        if error := resume_ignores(overrides):
            raise ConfigError(error)
        saved = read_summary(run_dir)
        if saved is None:
            raise ConfigError(f"resume: {cfg.resume!r} holds no readable {SUMMARY} with the run's config")
        if saved.diverged:
            raise ConfigError(f"resume: {run_dir} diverged at step {saved.diverged_at_step}; a diverged run has "
                              f"nothing to continue (start a new run with other settings)")
        resumed = recorded_config(saved.config, cfg)
        with open_dict(resumed):
            resumed.resume = str(cfg.resume)
            for key in set(keys) & set(RESUME_OVERRIDES[1:]):  # e.g. a finished run extended by epochs=N
                OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), force_add=True)
        sync_epochs(resumed, keys)
        refuse_starting_over(run_dir, ckpt, saved)
        done = len(saved.epochs)
        if rule_error("epochs", resumed.epochs):
            return resumed, run_dir, ckpt, saved  # validation names the bad value
        if resumed.epochs < done or (resumed.epochs == done and saved.status in FINISHED):
            raise ConfigError(f"resume: {run_dir} has finished {done} epoch(s), so epochs={resumed.epochs} leaves "
                              f"nothing to train; give epochs={done + 1} or more to extend it")
        if saved.status in FINISHED and not {"epochs", "trainer.max_epochs"} & set(keys):  # e.g. stopped early
            raise ConfigError(f"resume: {run_dir} is {saved.status} after {done} epoch(s) of {resumed.epochs}; "
                              f"give epochs=N to continue it (early stopping may stop it again)")
        return resumed, run_dir, ckpt, saved
    if holds_a_run(run_dir):
        raise ConfigError(f"{run_dir} already holds a run; pass resume=auto to skip or continue it, "
                          f"or choose another hydra.run.dir / hydra.sweep.dir")
    return cfg, run_dir, None, None


def refuse_starting_over(run_dir: Path, ckpt: Path | None, saved: RunSummary) -> None:
    """Raise ConfigError for a resume of a run that has finished epochs but no checkpoint: it would
    start over in place, and its record would be gone if it were stopped."""
    done = len(saved.epochs)
    if ckpt is None and done:
        if not saved.population:
            why = f"{run_dir / CHECKPOINT_DIR} holds no {LAST}; train it anew into another folder"
        elif saved.status in FINISHED:
            why = (f"a member of a population keeps none, and {saved.population.get('name')}'s was removed when it "
                   f"finished; train it anew into another folder")
        else:
            why = ("a member of a population keeps none: its population's is in the sweep folder's .populations/; "
                   "rerun the sweep with hydra/launcher=population and the same grouping")
        raise ConfigError(f"resume: {run_dir} has {done} finished epoch(s) but no checkpoint to continue from "
                          f"({why}); nothing was changed")


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for each leaf key both configs have with different values."""
    for key in old.keys() & new.keys():
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            yield from differences(old[key], new[key], f"{prefix}{key}.")
        elif old[key] != new[key]:
            yield f"{prefix}{key}", old[key], new[key]


def interpolates_resume_keys(raw: dict[str, Any], dotted: str) -> bool:
    """Whether the unresolved config ``raw`` has at ``dotted`` an interpolation of a
    :data:`MAY_DIFFER_ON_RESUME` key (``${epochs}``)."""
    value = dotted_value(raw, dotted)
    return isinstance(value, str) and any(re.search(r"\$\{[^}]*(?<![\w.])" + re.escape(key) + r"(?!\w)", value)
                                          for key in MAY_DIFFER_ON_RESUME)


def keep_derived_values(cfg: DictConfig, recorded: dict[str, Any]) -> None:
    """Set in ``cfg`` (a ``resume=auto`` run's, :func:`refuse_changed_config` passed) the ``recorded``
    value of every key that differs from it only because it derives from a key a resume may change: the
    continued run uses the recorded one (a cosine's ``T_max: ${epochs}`` is in its scheduler's state, which
    comes from the checkpoint), and its summary must say so."""
    now = comparable(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(cfg):
        for key, value, _ in list(differences(comparable(recorded), now)):
            OmegaConf.update(cfg, key, value, merge=False)


def config_changes(recorded: dict[str, Any], cfg: DictConfig, finished: bool = False) -> str | None:
    """What ``cfg`` changes of the ``recorded`` config (``key: old there, new here``, the first three), or
    None. Not compared: :data:`MAY_DIFFER_ON_RESUME` and what derives from them (``cfg`` is resolved with
    their recorded values), a key only one of them has (one added since the run was recorded), and, of a
    ``finished`` run, the diagnosis thresholds (``regimes``: its record is the same under others, only its
    label differs, which ``optimlab-report --rediagnose`` gives)."""
    recorded_cfg = OmegaConf.create(recorded)
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        for key in MAY_DIFFER_ON_RESUME:
            value = OmegaConf.select(recorded_cfg, key, default=None)
            if value is not None and OmegaConf.select(cfg, key, default=None) is not None:
                OmegaConf.update(cfg, key, value, merge=False)

    # A value that interpolates a key a resume may change is the recorded one where a run was continued
    # (keep_derived_values): T_max 2 recorded beside epochs 3, which ${epochs} would make 3.
    raw = OmegaConf.to_container(cfg, resolve=False)
    also = ("regimes",) if finished else ()
    given = comparable(OmegaConf.to_container(cfg, resolve=True), also)
    changed = sorted(f"{key}: {old!r} there, {new!r} here" for key, old, new in
                     differences(comparable(recorded, also), given) if not interpolates_resume_keys(raw, key))
    return "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "") if changed else None


def refuse_changed_config(run_dir: Path, saved: RunSummary, cfg: DictConfig, checkpointed: bool = False) -> None:
    """Raise ConfigError where ``resume=auto`` would continue the run in ``run_dir`` (one with finished
    epochs, or ``checkpointed``) with another config than it recorded (:func:`config_changes`): the run
    would mix two; or would skip a finished run of another config (an edited sweep rerun into its folder,
    whose jobs are numbered anew): the sweep would report that run as this job's."""
    finished = saved.status in FINISHED
    if not (saved.epochs or checkpointed or finished):
        return  # nothing to continue (e.g. a job refused before any work, its config since fixed)
    changed = config_changes(saved.config, cfg, finished)
    if changed:
        what = "skipping it would report that run as this job's" if finished else "continuing it would mix the two"
        raise ConfigError(f"resume=auto: {run_dir} holds a {'finished ' if finished else ''}run of another config "
                          f"({changed}); {what}: rerun with its values, or into another folder")


def refuse_foreign_checkpoint(path: Path, saved: dict[str, Any], cfg: DictConfig) -> None:
    """Raise ConfigError where the checkpoint at ``path``, whose run record saved ``saved``
    (:meth:`~optimlab.record.RunRecord.state_dict`), cannot continue the run of ``cfg``: it holds more
    finished epochs than ``cfg.epochs`` (Lightning would stop with a traceback), or it was saved by a run
    of another config (:func:`config_changes`; a checkpoint saved before 2026-12-07 holds none, and is
    taken as the run's). Its weights' shapes are checked by
    :func:`~optimlab.checkpointing.read_checkpoint`."""
    changed = config_changes(saved["config"], cfg) if "config" in saved else None
    if changed:
        raise ConfigError(f"resume: {str(path)!r} was saved by a run of another config ({changed}); continuing "
                          f"from it would mix the two; nothing was changed")
    done = len(saved.get("history", []))
    if done > cfg.epochs:
        raise ConfigError(f"resume: {str(path)!r} holds {done} finished epochs, more than epochs={cfg.epochs}; give "
                          f"epochs={done} or more; nothing was changed")
