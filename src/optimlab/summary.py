"""A run's record, ``summary.json``: its schema (declared once, here), the run's description, and
reading and writing it.

:class:`RunSummary` is what a run writes (after every epoch and at the end, atomically, so a
killed run still leaves a readable record) and what ``optimlab-report`` reads.
:func:`describe_run` names a run the same way for the console, TensorBoard and the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from optimlab.checks import is_count
from optimlab.files import atomic_write
from optimlab.mnist_files import DataError, epoch_batches
from optimlab.regimes import Diagnosis, Thresholds, diagnose

SUMMARY = "summary.json"
FINISHED = ("complete", "diverged")  # trained (all epochs, stopped early or diverged) and tested
STATUSES = ("running", *FINISHED, "interrupted", "crashed")
CONFIG_PARTS = ("model", "optimizer", "data", "trainer", "regimes", "curvature")  # mappings in a run's config
COLLECTIONS = ("callbacks", "logger")  # a run's config sections of named entries (each one instantiated)
# What a run returns to a sweeper (``optimized_metric``): validation only, never the test set,
# and whether larger is better.
OPTIMIZED_METRICS = {"val/acc_best": "maximize", "val/acc": "maximize", "val/loss_best": "minimize",
                     "val/loss": "minimize"}


@dataclass(frozen=True)
class RunDescription:
    """What a run is, in the words every view uses: ``sgd lr 0.1 mlp 1024x128 seed 0``."""

    name: str
    model: str          # the model class, lower case: mlp | cnn
    optimizer: str      # the optimizer class, lower case, "(torch)" for torch.optim's
    lr: float | None    # the optimizer's own learning rate (optimizer.lr), not the top-level default
    widths: str         # hidden widths (MLP) or conv channels (CNN), "x"-joined: 1024x128
    seed: int | None
    data_seed: int | None = None  # data.seed (the split and order): the seed where the config holds no integer one

    def __str__(self) -> str:
        return f"{self.optimizer} lr {self.lr:g} {self.model} {self.widths or '-'} seed {self.seed}" \
            if self.lr is not None else self.name


def describe_run(config: Mapping[str, Any]) -> RunDescription:
    """The description of the run a (resolved) config runs."""
    model, optimizer = config.get("model") or {}, config.get("optimizer") or {}
    widths = model.get("hidden") if "hidden" in model else model.get("channels")
    impl = " (torch)" if optimizer.get("impl") == "torch" else ""
    data_seed = (config.get("data") or {}).get("seed")  # an unresolved record's ${seed}: the seed itself
    return RunDescription(
        name=str(config.get("name", "")),
        model=str(model.get("_target_", "?")).rsplit(".", 1)[-1].lower(),
        optimizer=str(optimizer.get("_target_", "?")).rsplit(".", 1)[-1].lower() + impl,
        lr=optimizer.get("lr"), widths="x".join(str(w) for w in widths or []), seed=config.get("seed"),
        data_seed=data_seed if isinstance(data_seed, int) and not isinstance(data_seed, bool) else config.get("seed"))


def validation_size(config: Mapping[str, Any]) -> int | None:
    """How many images the run's validation set holds (``data.val_size``); None where the config
    does not say. The diagnosis needs it for the sampling noise of accuracy changes."""
    size = (config.get("data") or {}).get("val_size")
    return size if is_count(size) else None


def data_passes(config: Mapping[str, Any], epochs: int, train_size: int | None) -> float | None:
    """How many times, on average, a run has seen its training images in its ``epochs`` finished
    epochs: each epoch's batches (:func:`~optimlab.mnist_files.epoch_batches` of ``data.batch_size`` under
    ``trainer.limit_train_batches``) times the batch size, at most all ``train_size`` images; None
    where the record does not say. At most one pass the diagnosis knows there was nothing to memorise."""
    batch = (config.get("data") or {}).get("batch_size")
    if not (is_count(batch) and epochs and train_size):
        return None
    try:
        batches = epoch_batches(train_size, batch, (config.get("trainer") or {}).get("limit_train_batches"))
    except DataError:
        return None
    return epochs * min(train_size, batches * batch) / train_size


def diagnose_run(config: Mapping[str, Any], history: list[dict[str, float]], diverged: bool,
                 diverged_at_step: int | None, curvature: dict[str, Any] | None, train_size: int | None,
                 thresholds: Thresholds) -> Diagnosis:
    """:func:`~optimlab.regimes.diagnose` of a run's record: its rows and outcome, with the validation set's
    size and the passes over its training images that its ``config`` implies."""
    return diagnose(history, diverged, thresholds, diverged_at_step, curvature, validation_size(config),
                    data_passes(config, len(history), train_size))


def dotted_value(config: Mapping[str, Any], dotted: str) -> Any:
    """The value at the dotted key ``dotted`` of the plain nested dict ``config``, or None where it has none."""
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def drop_keys(config: dict[str, Any], dotted_keys: Iterable[str]) -> None:
    """Remove from the plain nested dict ``config``, in place, each of the dotted keys it has."""
    for dotted in dotted_keys:
        parent, _, last = dotted.rpartition(".")
        node = dotted_value(config, parent) if parent else config
        if isinstance(node, dict):
            node.pop(last, None)


def config_key(config: Mapping[str, Any], without: Iterable[str]) -> str:
    """``config`` (values, or a Hydra node: its values, interpolations resolved) without the dotted
    keys ``without``, as a string: two configs that differ only in those keys have the same key
    (seed aggregation, grouping jobs into populations)."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)  # type: ignore[assignment]
    config = json.loads(json.dumps(config, default=str))
    drop_keys(config, without)
    return json.dumps(config, sort_keys=True)


@dataclass
class RunSummary:
    """The schema of ``summary.json``. ``epochs`` holds one row per finished epoch: ``epoch``,
    ``train_loss``, ``train_acc``, ``train_loss_max`` (largest step loss), ``train_time_s``, the
    evaluated ``val_*`` / ``test_*`` loss and accuracy, and ``train_loss_initial`` in the first row;
    with sharpness tracking also ``sharpness_max``, ``sharpness_last``, ``threshold_last`` and
    ``sharpness_crossed_at_step`` (the epoch's first step with sharpness above the threshold).
    ``train_steps`` holds one row per logged step (every ``trainer.log_every_n_steps`` updates):
    ``step`` (the update's 0-based index), its batch's ``loss``, the ``grad_norm`` and the updated
    ``weight_norm`` (2-norms over all parameters) and the ``lr``. Non-finite numbers are written
    as null."""

    status: str                                  # one of STATUSES
    config: dict[str, Any]                       # the resolved config the run ran
    description: dict[str, Any] = field(default_factory=dict)  # describe_run(config), as a dict
    params: int | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)
    train_steps: list[dict[str, Any]] = field(default_factory=list)
    test_loss: float | None = None
    test_acc: float | None = None
    best_val_acc: float | None = None
    tested_checkpoint: str | None = None         # last | best
    diverged: bool = False                       # stopped on a non-finite loss, gradient or weight (the regime
                                                 # label "diverging" also covers runs that blew up finitely)
    diverged_at_step: int | None = None
    divergence_reason: str | None = None
    regime: str | None = None
    regime_evidence: list[str] = field(default_factory=list)
    regime_measures: dict[str, Any] = field(default_factory=dict)
    curvature: dict[str, Any] | None = None      # the run's sharpness record when tracked (curvature.every_n_steps)
    steps: int = 0
    train_time_s: float = 0.0
    steps_per_s: float | None = None             # leaves out the first step (warm-up, compilation)
    first_step_s: float | None = None
    wall_time_s: float = 0.0                     # summed over resumed sessions
    label_noise_images: int = 0
    train_size: int | None = None
    device: str | None = None
    population: dict[str, Any] | None = None     # the population it trained in (hydra/launcher=population)
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None                     # for status "crashed"

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    @property
    def run(self) -> RunDescription:
        return describe_run(self.config)

    def to_dict(self) -> dict[str, Any]:
        """The summary as ``summary.json`` holds it, sharing this object's lists and dicts (not a deep
        copy like ``dataclasses.asdict``: a population writes every member's summary after each epoch)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "interrupted": self.interrupted,
                "epochs_completed": len(self.epochs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSummary:
        """Read a summary, ignoring keys this version does not know (older or newer files)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def optimized_value(summary: RunSummary | None, metric: str) -> float:
    """``metric`` of a run (see :data:`OPTIMIZED_METRICS`): its best or last validation accuracy or
    loss. A run diagnosed ``diverging`` (stopped on a non-finite value or blown up), a crashed run
    and one without the value score the metric's worst value (0 for an accuracy, infinity for a
    loss), so a search learns to avoid it instead of stopping."""
    maximize = OPTIMIZED_METRICS[metric] == "maximize"
    worst = 0.0 if maximize else math.inf
    if summary is None or summary.status not in FINISHED or summary.diverged or summary.regime == "diverging":
        return worst
    kind = "val_acc" if metric.startswith("val/acc") else "val_loss"
    values = [row[kind] for row in summary.epochs if math.isfinite(row.get(kind, math.nan))]
    if not values:
        return worst
    if metric.endswith("_best"):
        return max(values) if maximize else min(values)
    return values[-1]


def returned_value(summary: RunSummary | None, config: Mapping[str, Any]) -> float:
    """What a job returns to a sweeper: :func:`optimized_value` of its config's ``optimized_metric``
    (``val/acc_best``, conf's default, where the config names none)."""
    return optimized_value(summary, config.get("optimized_metric") or "val/acc_best")


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null: strict JSON readers (and jq) reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_summary(run_dir: Path, summary: RunSummary) -> Path:
    path = run_dir / SUMMARY
    text = json.dumps(_jsonable(summary.to_dict()), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def read_summary(run_dir: Path) -> RunSummary | None:
    """The run's summary, or None when there is none or it cannot be read as one (not JSON, or not
    shaped as :class:`RunSummary`: a file edited by hand or written by another program)."""
    try:
        data = json.loads((run_dir / SUMMARY).read_text())
        summary = RunSummary.from_dict(data) if isinstance(data, dict) and "status" in data else None
    except (OSError, ValueError, TypeError):
        return None
    return summary if summary is not None and well_formed(summary) else None


def well_formed(summary: RunSummary) -> bool:
    """Whether the fields a reader computes with have the schema's shapes: a known status, the config a
    mapping (and its sections), each epoch and logged step a row of numbers (or nulls), each epoch numbered,
    the label and error texts, the sharpness record's series rows of three numbers (or nulls) and its other
    values numbers (its formula a text), and the numbers the report reads (the test accuracy and loss, the
    divergence step, the parameter count, throughput, wall time, training images and seed) numbers or nulls."""
    def number(value: Any) -> bool:
        return value is None or isinstance(value, (int, float))

    def rows(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(row, dict) and all(map(number, row.values()))
                                               for row in value)

    curvature = {} if summary.curvature is None else summary.curvature
    series = curvature.get("series", []) if isinstance(curvature, dict) else None
    def config_shaped(config: Any) -> bool:  # what describe_run and the report read from it
        if not (isinstance(config, dict) and all(isinstance(config.get(part) or {}, dict) for part in CONFIG_PARTS)):
            return False
        model = config.get("model") or {}
        return all(isinstance(model.get(widths) or [], list) for widths in ("hidden", "channels"))

    return (summary.status in STATUSES and config_shaped(summary.config)
            and rows(summary.epochs) and all(isinstance(row.get("epoch"), int) for row in summary.epochs)
            and rows(summary.train_steps) and all(isinstance(text, (str, type(None))) for text in
                                                 (summary.regime, summary.error, summary.divergence_reason))
            and isinstance(series, list)  # not a list where the record is not a mapping
            and all(isinstance(row, list) and len(row) == 3 and all(map(number, row)) for row in series)
            and isinstance(curvature.get("measurements", 0), int)
            and all(number(value) for key, value in curvature.items() if key not in ("series", "threshold_formula"))
            and isinstance(curvature.get("threshold_formula") or "", str)  # null where the threshold is not finite
            and all(map(number, (summary.params, summary.test_loss, summary.test_acc, summary.best_val_acc,
                                 summary.diverged_at_step, summary.steps_per_s, summary.wall_time_s,
                                 summary.train_size)))
            and isinstance(summary.diverged, bool) and number((summary.config or {}).get("seed")))


def is_complete(run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return summary is not None and summary.status in FINISHED
