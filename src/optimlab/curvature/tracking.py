"""Sharpness tracked during training: :class:`SharpnessTracker` (warm-started measurements),
:class:`SharpnessLog` (the per-epoch and whole-run records) and the Lightning :class:`SharpnessCallback`
(measures every ``every_n_steps``, logs to the trainer's loggers)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn

from optimlab.checks import is_count
from optimlab.curvature.hessian import top_eigenpair, trainable, valid_preconditioner
from optimlab.curvature.lanczos import check_iteration
from optimlab.curvature.stability import (gradient_moments, initial_preconditioner, preconditioner,
                                          stability_threshold, threshold_formula, uses_preconditioner)

# Probe images for tracking during training. A small probe's Hessian has a larger top eigenvalue
# than the training loss's; on the default MLP after 1000 SGD steps (benchmarks/curvature.py) the
# sharpness on 1024 images was 1.13x the one on 4096, on 256 images 1.45x, on 64 images 2.1x.
DEFAULT_PROBE_SIZE = 1024
# The callback's tolerance. On the default MLP (probe 512, SGD lr 0.1, a measurement every 40 of 400
# steps, warm-started) 2e-2 took 3 Hessian-vector products per measurement (10 cold) with values within
# 7e-4 of a tight recomputation; 1e-2 took 3-4 (within 1.7e-4); sharpness's 1e-3 takes about 6.
DEFAULT_TRACKING_TOL = 2e-2
# Products a tracker's cold measurement (a random start: its first, or after only non-finite ones) may
# take whatever its ``iters``: a random start took 10 at probe 512 (above); at iters 2 a width-16 MLP's
# value at initialisation, the map's predicted boundary, came out 19x low (a black-box probe, 2026-12-06).
COLD_START_ITERS = 20

SHARPNESS_TAG = "curvature/sharpness"
THRESHOLD_TAG = "curvature/threshold"
# TensorBoard's Custom Scalars layout that draws the two on one chart.
TENSORBOARD_LAYOUT = {
    "curvature": {"sharpness vs threshold": ["Multiline", [f"^{SHARPNESS_TAG}$", f"^{THRESHOLD_TAG}$"]]}}


def epoch_columns(epoch: dict[str, Any]) -> dict[str, Any]:
    """The columns a tracked run's epoch row gets from its epoch record (:meth:`SharpnessLog.epoch_record`):
    none for an epoch without a measurement."""
    if not epoch["measurements"]:
        return {}
    return {"sharpness_max": epoch["sharpness_max"], "sharpness_last": epoch["sharpness_last"],
            "threshold_last": epoch["threshold_last"], "sharpness_crossed_at_step": epoch["first_crossing_step"]}


class SharpnessTracker:
    """:func:`sharpness` warm-started from the previous call's eigenvector, for tracking a model
    during training: once the eigenvector moves little between calls, a call needs only a few
    Hessian-vector products.

    Args:
        iters, tol: see :func:`lanczos`; a cold call (none finite yet: a random start) takes up to
            ``max(iters, COLD_START_ITERS)`` products.
        seed: seeds the first call's random start vector (a private generator; torch's global
            one is never drawn from).

    Attributes:
        vector: the last finite call's eigenvector (None before). iterations: the last call's
            number of Hessian-vector products.
    """

    def __init__(self, iters: int = 20, tol: float = DEFAULT_TRACKING_TOL, seed: int = 0) -> None:
        check_tracking_iteration(iters, tol)
        self.iters, self.tol = iters, tol
        self.generator = torch.Generator().manual_seed(seed)
        self.vector: list[Tensor] | None = None
        self.iterations = 0

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, preconditioner: Sequence[Tensor] | None = None) -> float:
        pair = top_eigenpair(model, x, y, preconditioner, measurement_iters(self.iters, self.vector is not None),
                             self.tol, init=self.vector,
                             generator=self.generator)
        self.iterations = pair.iterations
        if math.isfinite(pair.value):  # a NaN vector would poison every later start
            self.vector = pair.vector
        return pair.value

    def state_dict(self) -> dict[str, Any]:
        return {"vector": None if self.vector is None else [v.cpu() for v in self.vector],
                "generator": self.generator.get_state(), "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vector = state["vector"]
        self.generator.set_state(state["generator"])
        self.iterations = state["iterations"]


def measurement_iters(iters: int, warm: bool) -> int:
    """The products a tracker's measurement may take: ``iters`` from a warm start, at least
    :data:`COLD_START_ITERS` from a random one."""
    return iters if warm else max(iters, COLD_START_ITERS)


def check_tracking_iteration(iters: object, tol: object) -> None:
    """:func:`check_iteration`, and ``iters`` at least 2: a one-product Lanczos measures the start vector's
    Rayleigh quotient and returns that same vector, so a warm-started tracker would never move off its
    random first start."""
    check_iteration(iters, tol)
    if iters < 2:  # type: ignore[operator]
        raise ValueError(f"Invalid iters: {iters!r} (must be >= 2 when tracking: one product only measures the "
                         "start vector, which then never improves)")


def check_tracking(every_n_steps: object, probe_size: object, batch_size: object = None) -> None:
    """A ValueError naming ``every_n_steps``, ``probe_size`` or ``batch_size`` (None: not given) unless
    each is an integer >= 1."""
    for key, value in (("every_n_steps", every_n_steps), ("probe_size", probe_size), ("batch_size", batch_size)):
        if (key != "batch_size" or value is not None) and not is_count(value):
            raise ValueError(f"Invalid {key}: {value!r} (must be an integer >= 1)")


def measurement_due(step: int, every_n_steps: int, log_spaced_start: bool) -> bool:
    """Whether tracking measures after optimizer step ``step`` (>= 1): every ``every_n_steps``, and
    with ``log_spaced_start`` also at steps 1, 2, 4, ... below it."""
    early = log_spaced_start and step < every_n_steps and step & (step - 1) == 0
    return step % every_n_steps == 0 or early


def probe_indices(n: int, size: int, seed: int) -> Tensor:
    """Which of ``n`` training examples make up a probe of ``size`` (all when fewer), chosen by ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def _nanmax(values: Iterable[float]) -> float | None:
    values = list(values)
    if not values:
        return None
    finite_or_inf = [v for v in values if not math.isnan(v)]
    return max(finite_or_inf) if finite_or_inf else math.nan


class SharpnessLog:
    """Sharpness measurements of a run, summarised per epoch and for the whole run.

    A measurement is a crossing when ``sharpness > threshold`` (a NaN sharpness never is; an
    infinite one is unless the threshold is infinite too). The record of an epoch (see
    :meth:`epoch_record`) holds ``epoch``, ``measurements``, ``sharpness_max`` (over the non-NaN
    values; NaN if all were NaN), ``sharpness_last``, ``threshold_last``, ``first_crossing_step``
    and the sharpness and threshold measured there (``crossing_sharpness``, ``crossing_threshold``);
    values are None when the epoch had no measurement or no crossing. :attr:`series` keeps every
    measurement as ``[step, sharpness, threshold]``.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.series: list[list[float]] = []
        self.first_crossing_step: int | None = None
        self.first_crossing: tuple[float, float] | None = None  # (sharpness, threshold) there
        self.initial: tuple[int, float, float] | None = None    # the first measurement: (step, sharpness, threshold)
        self.measurements = 0
        self.sharpness_max: float | None = None
        self._epoch: int | None = None
        self._values: list[float] = []
        self._last: tuple[float, float] | None = None
        self._crossing: int | None = None
        self._crossing_values: tuple[float, float] | None = None
        self._ended = False

    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch``'s record, first ending the previous one if :meth:`end_epoch` was not
        called for it (a checkpoint saved before that call, then resumed); a no-op when ``epoch``
        is already the current one (a run resumed mid-epoch keeps what was recorded before)."""
        if epoch == self._epoch:
            return
        if self._epoch is not None and not self._ended:
            self.end_epoch()
        self._epoch, self._values, self._last, self._ended = epoch, [], None, False
        self._crossing, self._crossing_values = None, None

    def add(self, step: int, sharpness: float, threshold: float) -> bool:
        """Record one measurement at optimizer step ``step``; return whether it is a crossing."""
        crossed = sharpness > threshold
        self.series.append([step, sharpness, threshold])
        if self.initial is None:
            self.initial = (step, sharpness, threshold)
        self._values.append(sharpness)
        self._last = (sharpness, threshold)
        self.measurements += 1
        self.sharpness_max = _nanmax([sharpness] + ([] if self.sharpness_max is None else [self.sharpness_max]))
        if crossed and self._crossing is None:
            self._crossing, self._crossing_values = step, (sharpness, threshold)
        if crossed and self.first_crossing_step is None:
            self.first_crossing_step, self.first_crossing = step, (sharpness, threshold)
        return crossed

    def epoch_record(self) -> dict[str, Any]:
        """The current (or, after :meth:`end_epoch`, the just finished) epoch's record."""
        return {"epoch": self._epoch, "measurements": len(self._values), "sharpness_max": _nanmax(self._values),
                "sharpness_last": None if self._last is None else self._last[0],
                "threshold_last": None if self._last is None else self._last[1],
                "first_crossing_step": self._crossing,
                "crossing_sharpness": None if self._crossing_values is None else self._crossing_values[0],
                "crossing_threshold": None if self._crossing_values is None else self._crossing_values[1]}

    def end_epoch(self) -> dict[str, Any]:
        """Append the current epoch's record to :attr:`history` (once) and return it."""
        record = self.epoch_record()
        if not self._ended:
            self.history.append(record)
            self._ended = True
        return record

    def run_record(self, **about: Any) -> dict[str, Any]:
        """``measurements``, ``sharpness_max``, ``first_crossing_step`` and the sharpness and
        threshold there (``crossing_sharpness``, ``crossing_threshold``) over the whole run, the
        first measurement (``initial_step``, ``initial_sharpness``, ``initial_threshold``) and
        every measurement (``series``: ``[step, sharpness, threshold]`` rows); then ``about`` (what the
        tracker adds: ``threshold_formula``, ``preconditioned``, ``probe_images``)."""
        crossing, initial = self.first_crossing or (None, None), self.initial or (None, None, None)
        return {"measurements": self.measurements, "sharpness_max": self.sharpness_max,
                "first_crossing_step": self.first_crossing_step, "crossing_sharpness": crossing[0],
                "crossing_threshold": crossing[1], "initial_step": initial[0], "initial_sharpness": initial[1],
                "initial_threshold": initial[2], "series": [list(row) for row in self.series], **about}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "series": [list(r) for r in self.series],
                "first_crossing_step": self.first_crossing_step,
                "first_crossing": self.first_crossing, "initial": self.initial, "measurements": self.measurements,
                "sharpness_max": self.sharpness_max, "epoch": self._epoch, "values": list(self._values),
                "last": self._last, "crossing": self._crossing, "crossing_values": self._crossing_values,
                "ended": self._ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state["history"]]
        self.series = [list(r) for r in state.get("series", [])]  # absent from checkpoints before it existed
        self.first_crossing_step, self.measurements = state["first_crossing_step"], state["measurements"]
        self.sharpness_max, self._epoch = state["sharpness_max"], state["epoch"]
        self._values, self._last, self._crossing = list(state["values"]), state["last"], state["crossing"]
        self.first_crossing, self._crossing_values = state["first_crossing"], state["crossing_values"]
        self.initial = state["initial"]
        self._ended = state["ended"]


def show_sharpness_chart(loggers: Iterable[Logger]) -> None:
    """Put the sharpness and its threshold on one chart in each TensorBoard logger of ``loggers``."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(TENSORBOARD_LAYOUT)


class SharpnessCallback(L.Callback):
    """Track the (preconditioned) sharpness of ``pl_module.model`` every ``every_n_steps`` optimizer
    steps against the stability threshold of ``trainer.optimizers[0]``.

    At each ``trainer.global_step`` that is a positive multiple of ``every_n_steps`` (after the
    step; with ``log_spaced_start`` also at steps 1, 2, 4, ... below ``every_n_steps`` and at step 0,
    the initialisation) it computes the sharpness on a fixed probe batch, preconditioned by
    :func:`preconditioner` for the adaptive optimizers (at step 0 by :func:`initial_preconditioner`
    of the probe's minibatches of the training batch size), with a :class:`SharpnessTracker`
    (warm-started), and :func:`stability_threshold` of param group 0. Both go to every logger as
    ``curvature/sharpness`` and ``curvature/threshold`` at that step; a TensorBoard logger also
    gets a custom-scalars layout that draws the two on one chart (the "Custom Scalars" tab; it
    replaces any other layout written to the same run). :attr:`sharpness_log` (a :class:`SharpnessLog`)
    keeps per-epoch records (:meth:`epoch_record` holds the last epoch's until the next starts;
    :attr:`history` all finished ones) and the run's first crossing.

    The training trajectory is unchanged: the computation runs in eval mode and uses
    ``torch.autograd.grad`` (no dropout draws, no change to ``p.grad``), and the probe and the
    start vector come from private generators. A non-finite result (or a preconditioner with
    entries that are NaN or not positive, which is then not used) is recorded as NaN / inf and
    training goes on.

    Args:
        every_n_steps: measurement cadence in optimizer steps (>= 1).
        probe_size: images in the probe, drawn without replacement by ``seed`` from
            ``trainer.datamodule.train_x`` / ``train_y`` (all of them if fewer).
        seed: seeds the probe draw and the first start vector.
        probe: ``(x, y)`` to use instead of drawing from the data module.
        iters, tol: per measurement, see :func:`lanczos` (the tolerance is looser than
            :func:`sharpness`'s: about half the products, see ``DEFAULT_TRACKING_TOL``).
        log_spaced_start: also measure early, where a large lr's spike and the sharpness's first
            rise happen, and at the initialisation (the value the report's predicted largest stable
            lr rests on).
        batch_size: the training batch size, whose minibatch gradients the adaptive optimizers'
            preconditioner at step 0 averages (None: the datamodule's ``batch_size``; without
            one, the whole probe is one batch).

    A measurement costs roughly ``1 + iterations`` Hessian-vector products on the probe, each about
    a training step on as many images: on the 2-core CPU, the default MLP and 1024 probe images,
    30-50 training steps of batch 128 (docs/curvature.md), so ``every_n_steps`` of 150 or more keeps
    the overhead within 20%.
    """

    def __init__(self, every_n_steps: int, probe_size: int = DEFAULT_PROBE_SIZE, seed: int = 0,
                 probe: tuple[Tensor, Tensor] | None = None, iters: int = 20,
                 tol: float = DEFAULT_TRACKING_TOL, log_spaced_start: bool = True,
                 batch_size: int | None = None) -> None:
        check_tracking(every_n_steps, probe_size, batch_size)
        if probe is not None and (len(probe) != 2 or len(probe[0]) != len(probe[1]) or len(probe[1]) == 0):
            raise ValueError("Invalid probe: must be a pair (x, y) of the same nonzero length")
        self.every_n_steps, self.probe_size, self.seed = every_n_steps, probe_size, seed
        self.log_spaced_start, self.batch_size = log_spaced_start, batch_size
        self.given_probe = probe
        self.tracker = SharpnessTracker(iters, tol, seed)
        self.sharpness_log = SharpnessLog()
        self.probe: tuple[Tensor, Tensor] | None = None
        self.last_step = 0
        self._pending: dict[str, Any] | None = None  # a resumed run's saved state, until its fit applies it
        self.threshold_formula: str | None = None
        self.preconditioned = False

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.sharpness_log.history

    def epoch_record(self) -> dict[str, Any]:
        """See :meth:`SharpnessLog.epoch_record`."""
        return self.sharpness_log.epoch_record()

    def run_record(self) -> dict[str, Any]:
        """:meth:`SharpnessLog.run_record`, with ``threshold_formula`` (the threshold in words at
        the start of training, e.g. ``2/lr`` or ``38/lr``), ``preconditioned`` (adaptive optimizers) and
        ``probe_images`` (the probe's size: ``probe_size``, or the whole training set where smaller)."""
        return self.sharpness_log.run_record(threshold_formula=self.threshold_formula,
                                             preconditioned=self.preconditioned,
                                             probe_images=None if self.probe is None else len(self.probe[1]))

    def draw_probe(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``probe_size`` examples of ``(x, y)`` chosen by ``seed`` (all when there are fewer)."""
        idx = probe_indices(len(y), self.probe_size, self.seed).to(y.device)
        return x[idx], y[idx]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()
        if not isinstance(getattr(pl_module, "model", None), nn.Module):
            raise ValueError("SharpnessCallback needs the LightningModule's classifier as its .model attribute")
        optimizer = trainer.optimizers[0]
        # an optimizer with no known threshold fails here, not mid-run
        self.threshold_formula = threshold_formula(optimizer, float(optimizer.param_groups[0]["lr"]))
        self.preconditioned = uses_preconditioner(optimizer)
        if self.given_probe is not None:
            x, y = self.given_probe
        else:
            data = trainer.datamodule
            if data is None or not hasattr(data, "train_x"):
                raise ValueError("SharpnessCallback needs probe=(x, y) or a datamodule with train_x / train_y")
            x, y = self.draw_probe(data.train_x, data.train_y)
        self.probe = (x.to(pl_module.device), y.to(pl_module.device))
        if self.batch_size is None:
            self.batch_size = getattr(trainer.datamodule, "batch_size", None) or len(y)
        if trainer.ckpt_path is None:  # a resumed run's first session wrote it (a second copy is a point twice)
            show_sharpness_chart(trainer.loggers)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()  # a resumed run with no epoch left to train never starts training

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()  # for a strategy that loads the checkpoint after on_fit_start
        if self.log_spaced_start and trainer.global_step == 0:
            self.sharpness_log.start_epoch(trainer.current_epoch)
            self._record(trainer, pl_module, 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sharpness_log.start_epoch(trainer.current_epoch)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (>= 1) is measured."""
        return measurement_due(step, self.every_n_steps, self.log_spaced_start)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # The step counter stays put when a step is skipped (e.g. a non-finite loss): measure once.
        if step == 0 or not self.due(step) or step == self.last_step:
            return
        self.last_step = step
        self._record(trainer, pl_module, step)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        value, threshold = self.measure(pl_module.model, trainer.optimizers[0], initial=step == 0)
        self.sharpness_log.add(step, value, threshold)
        for logger in trainer.loggers:
            logger.log_metrics({SHARPNESS_TAG: value, THRESHOLD_TAG: threshold}, step=step)

    def measure(self, model: nn.Module, optimizer: torch.optim.Optimizer, initial: bool = False) -> tuple[float, float]:
        """``(sharpness, threshold)`` of ``model`` on the probe, preconditioned by ``optimizer``'s state
        (``initial``: by its :func:`initial_preconditioner` on the probe, for step 0)."""
        if self.probe is None:
            raise RuntimeError("SharpnessCallback.measure() needs the probe that on_fit_start draws")
        params = trainable(model)
        if initial and self.preconditioned:
            precond = initial_preconditioner(optimizer, gradient_moments(model, *self.probe, self.batch_size), params)
        else:
            precond = preconditioner(optimizer, params)
        if precond is not None and not valid_preconditioner(precond):
            return math.nan, stability_threshold(optimizer)
        return self.tracker(model, *self.probe, precond), stability_threshold(optimizer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sharpness_log.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"log": self.sharpness_log.state_dict(), "tracker": self.tracker.state_dict(),
                "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in a fit only (restore): testing a checkpoint (test_ckpt=best) loads it too, and must
        # keep this run's measurements (those after the best epoch happened too).
        self._pending = state_dict

    def restore(self) -> None:
        """A resumed run's records and warm start from its checkpoint, once."""
        saved, self._pending = self._pending, None
        if saved is None:
            return
        self.sharpness_log.load_state_dict(saved["log"])
        self.tracker.load_state_dict(saved["tracker"])
        self.last_step = saved["last_step"]
