"""Diagnose a run's training regime from its per-epoch history.

Labels: ``healthy``, ``slow``, ``oscillating``, ``diverging``, ``underfit``, ``overfit``; none (None) for a run
that neither diverged nor finished an epoch.
The rules are checked in this order; the first that fires names the regime:

1. **diverging**: the run hit a non-finite loss, gradient or weight; or its final validation
   accuracy is at chance level (``<= chance_acc``) and the training loss has blown up (above
   ``loss_blowup`` x max(ln(10), the first step's loss); ln(10) is the loss of uniform guessing) or
   is no longer falling (above its best epoch by ``> diverge_loss_rise`` relative, or rising by
   ``>= osc_min_loss_rise`` nats between any two of the last ``window`` + 1 epochs: a run stuck at
   ln(10) whose epoch means differ by thousandths is not climbing); or a training step's loss blew
   up (above that same bound) and the run has not recovered (final validation accuracy
   ``< fit_acc`` and final train loss above ``underfit_loss_ratio`` x ln(10): it has not learned
   since). A run at chance whose loss still falls steadily is *slow*, not diverging.
   **oscillating** (unstable, yet learning): a step's loss blew up, yet the final validation
   accuracy is ``>= fit_acc`` (converged), or the run learned after it (final train loss
   ``<= underfit_loss_ratio`` x ln(10)) without reaching ``fit_acc``: an Adam run at 83% after an
   early blow-up is unstable, not diverging. Such spikes are the oscillation at the edge of
   stability; epoch means hide them, so each epoch records its largest step loss (``train_loss_max``).
2. **oscillating**, converging: validation accuracy jumps (it falls by ``>= osc_acc_drop`` between
   consecutive epochs at least ``osc_min_drops`` times, or by ``>= osc_big_drop`` once), climbs back
   (a rise ``>= osc_acc_drop`` after the first fall) and ends within ``overfit_acc_drop`` of its best,
   and the instability persists. An *instability* is an epoch in which validation accuracy fell by
   ``>= osc_acc_drop`` or the training loss rose by ``>= osc_loss_rise`` (and ``>= osc_min_loss_rise``
   nats); a fall and the rise of the next epoch's mean loss are one (a spike at the epoch's end).
   Instabilities persist when ``osc_min_drops`` of them come within ``window`` epochs of each other,
   or when ``osc_min_drops`` or more come at over one per ``osc_spike_epochs`` epochs (two far apart in
   a 10-epoch run recur; in a 20-epoch run they may be catapults). Ones that do not persist, each followed
   by a climb back (accuracy to within ``osc_acc_drop`` of where it fell from, the loss to within
   ``osc_loss_rise`` of where it rose from), are transient spikes: the rules below judge the run as if
   they had not happened, on its curves with a fallen epoch's validation results and a risen epoch's
   training loss held at the epoch before's (a fitted run is then **healthy** unless it overfits), and
   its evidence lists them. (A fitted CNN at lr 0.06 fell
   0.014 in epoch 4 and 0.023 in epoch 10, each time back the next epoch; another's training loss
   rose from 0.0088 to 0.0237 in epoch 13 and fell back to 0.0082: catapults, not an oscillation.)
3. **overfit**: training keeps improving (final train loss below its value at the validation peak)
   while validation gets worse: validation accuracy has fallen ``>= overfit_acc_drop`` below its
   peak at least ``overfit_min_epochs_after_peak`` epochs before the end, or validation loss has
   risen ``>= overfit_loss_rise`` (relative) and ``>= overfit_min_loss_rise`` nats above its minimum,
   both averaged over ``window`` epochs (fewer in a run shorter than twice that): a fitted net's
   validation loss near zero moves by a few thousandths from epoch to epoch, and one low epoch as
   the minimum made such wobbles read as a rise. In a fitted run, a validation loss over those bars only
   with its last epoch, which was unstable (validation accuracy fell as in rule 2, or the tracked sharpness
   went over the stability threshold), is that instability, not overfitting: it is said in the evidence.
   Or the training set is memorised (final train accuracy ``>= overfit_train_acc``) with validation
   accuracy ``>= overfit_gap`` below it. The training curve must be smooth (no epoch-mean train
   loss rise ``>= osc_loss_rise`` relative; rises smaller than ``osc_min_loss_rise`` nats never count,
   so that a well-fitted run's loss wobbling near zero, 0.006 to 0.009, is not taken for instability).
   **oscillating** again when rule 3 does not hold but validation accuracy jumps as in rule 2 or the
   training loss rises ``>= osc_loss_rise`` (and ``>= osc_min_loss_rise`` nats) between epochs, other
   than in transient spikes (unstable, not converging).
4. **overfit** (stalled), **slow** or **underfit**: final validation accuracy ``< fit_acc``. If
   validation accuracy peaked at least ``overfit_min_epochs_after_peak`` epochs before the end, the
   validation loss ends above its minimum, the training loss has fallen ``>= overfit_stall_loss_drop``
   (relative) since, and the gap between train and validation accuracy has grown since by more than
   the sampling noise below (more than 0 when unknown), more epochs only fit the training set:
   **overfit** (what early stopping detects; ``overfit_early_stop`` ends this way).
   Otherwise, if the training loss is still falling by ``>= slow_min_loss_drop`` nats per epoch
   (averaged over the last ``window`` epochs; after a single epoch, measured from ln(10), the loss
   of uniform guessing) the run is **slow**
   (more epochs or a larger learning rate would help); if it has plateaued after learning (final
   train loss ``<= underfit_loss_ratio`` x ln(10): well below uniform guessing, whatever the first
   step's loss was; a wide net can start far above ln(10) and come down to it without learning) it is
   **underfit** (the model is too small or too constrained to fit the data); a run that has barely
   left its starting loss is still **slow**. The drop is absolute, not relative.
5. otherwise **healthy**.

A run of rules 3 to 5 whose largest step loss rose ``>= osc_loss_rise`` above its start (max(ln(10), the
first step's loss)), short of the blow-up level, gets that rise in its evidence (with the sharpness
crossing where tracked): evidence only, the label stays.

No overfit rule applies to a run that has seen its training images at most ``overfit_min_passes``
times on average (``passes``: one pass or less, as the fine regime map's budget): there is nothing to
memorise, and a gap between the running training accuracy and the end-of-epoch validation accuracy
comes from the measurement (an unstable net's weights at the epoch's end are not its average over
the epoch); the pattern is then a note in the evidence and the run is judged by the other rules.

Validation accuracy is measured on a finite set, so it moves by chance from epoch to epoch: on
``n`` images at accuracy ``p`` the difference of two measurements has a standard error of about
``sqrt(2 p (1 - p) / n)`` (0.022 at p = 0.45 on 1,000 images, 0.0028 at p = 0.98 on 5,000). When the
validation set's size is known (``val_size``), a fall or rise of validation accuracy counts (rules 2
and 3) only when it is also at least ``val_noise_z`` such standard errors (``p``: the run's mean
validation accuracy); a narrow net's chance wobbles are then not read as oscillation or overfitting.

Every threshold is a field of :class:`Thresholds`, overridable from the config key ``regimes``.

When the run tracked its sharpness (``curvature.every_n_steps``), the evidence of a diverging or
oscillating run cites it against the optimizer's stability threshold (the edge of stability) and
the measures keep the numbers; the sharpness explains a label, it never decides one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from optimlab.checks import finite_number, is_count

LABELS = ("healthy", "slow", "oscillating", "diverging", "underfit", "overfit")


@dataclass(frozen=True)
class Thresholds:
    chance_acc: float = 0.2             # accuracy at or below this is chance level (10 classes)
    diverge_loss_rise: float = 0.02     # final train loss this much (relative) above its best: not converging
    loss_blowup: float = 2.0            # loss above this many times max(ln(10), first step loss): blown up
    overfit_acc_drop: float = 0.01      # val accuracy this far below its peak ...
    overfit_loss_rise: float = 0.2      # ... or val loss this much (relative) above its minimum (averaged) ...
    overfit_min_loss_rise: float = 0.01  # ... and by at least this much (nats)
    osc_acc_drop: float = 0.01          # an epoch-to-epoch val accuracy fall this big counts as a drop
    osc_min_drops: int = 2              # this many drops, or as many instabilities within `window` epochs: oscillating
    osc_spike_epochs: int = 8           # osc_min_drops instabilities or more, over one per this many epochs: they recur
    osc_big_drop: float = 0.03          # one fall this big makes validation accuracy jump (oscillating if it persists)
    osc_loss_rise: float = 0.05         # epoch-mean train loss rising this much (relative): oscillating ...
    osc_min_loss_rise: float = 0.01     # ... and by at least this much (nats): noise on a near-zero loss is not
    overfit_min_epochs_after_peak: int = 2  # the val peak must lie this many epochs before the end
    overfit_train_acc: float = 0.99     # training set memorised ...
    overfit_gap: float = 0.05           # ... with val accuracy this far below train accuracy
    overfit_stall_loss_drop: float = 0.05  # below fit_acc: val peak settled while train loss fell this much (relative)
    fit_acc: float = 0.93               # final val accuracy below this: slow or underfit
    underfit_loss_ratio: float = 0.75   # a plateau counts as underfit only below this x ln(10)
    slow_min_loss_drop: float = 0.01    # train loss still falling this much (nats) per epoch: slow
    window: int = 3                     # epochs of recent loss changes, averaged val loss, close instabilities
    val_noise_z: float = 2.0            # val accuracy changes within this many standard errors are chance
    overfit_min_passes: float = 1.0     # overfit needs the training images seen more than this many times on average

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                ok, allowed = is_count(value), "an integer >= 1"
            elif f.name in FRACTIONS:
                ok, allowed = finite_number(value) and 0 <= value <= 1, "a number in [0, 1]"
            else:
                ok, allowed = finite_number(value) and value >= 0, "a number >= 0"
            if not ok:
                raise ValueError(f"regimes.{f.name}: {value!r} is not allowed; expected {allowed}")
        if self.chance_acc >= self.fit_acc:  # a fitted run would count as at chance
            raise ValueError(f"regimes.chance_acc: {self.chance_acc!r} is not allowed; expected a number below "
                             f"regimes.fit_acc ({self.fit_acc!r})")
        if self.loss_blowup <= 1:  # the first step's own loss would count as blown up
            raise ValueError(f"regimes.loss_blowup: {self.loss_blowup!r} is not allowed; expected a number > 1")
        if self.osc_big_drop < self.osc_acc_drop:  # a big fall that is no fall at all
            raise ValueError(f"regimes.osc_big_drop: {self.osc_big_drop!r} is not allowed; expected a number >= "
                             f"regimes.osc_acc_drop ({self.osc_acc_drop!r})")
        if self.osc_min_drops > self.window + 1:  # never that many instabilities within `window` epochs
            raise ValueError(f"regimes.osc_min_drops: {self.osc_min_drops!r} is not allowed; expected at most "
                             f"regimes.window + 1 ({self.window + 1!r})")

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None) -> Thresholds:
        """The defaults with ``overrides`` (a config's ``regimes`` node, or None); a ValueError names unknown keys."""
        if overrides is not None and not isinstance(overrides, Mapping):
            raise TypeError(f"regimes: {overrides!r} is not allowed; expected a mapping of threshold names to values")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides or {}) - known
        if unknown:
            raise ValueError(f"regimes: unknown threshold(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**(overrides or {}))


# Thresholds that are accuracies or fractions of one.
FRACTIONS = {"chance_acc", "overfit_acc_drop", "osc_acc_drop", "osc_big_drop", "overfit_train_acc", "overfit_gap",
             "fit_acc", "underfit_loss_ratio"}


@dataclass
class Diagnosis:
    regime: str | None           # None: no finished epoch to judge (and no divergence)
    evidence: list[str]          # the rule that fired, with the numbers that crossed its thresholds
    measures: dict[str, float]   # every quantity the rules look at


def decimals(x: float, places: int) -> str:
    """``x`` to ``places`` decimals, or to 3 significant digits from 1e6 up (a blown-up loss of 1.7e31 had
    printed as 32 digits)."""
    return f"{x:.{places}f}" if abs(x) < 1e6 else f"{x:.3g}"


def _series(history: list[dict[str, float]], key: str) -> list[float]:
    return [float(row[key]) for row in history if key in row and row[key] is not None and math.isfinite(row[key])]


def val_acc_noise(val_acc: list[float], val_size: int | None, z: float) -> float:
    """``z`` standard errors of the difference of two accuracies measured on ``val_size`` images at
    the mean of ``val_acc``: the size of a change that chance alone rarely makes (0 when unknown)."""
    if not val_size or not val_acc:
        return 0.0
    p = sum(val_acc) / len(val_acc)
    return z * math.sqrt(2 * p * (1 - p) / val_size)


def measure(history: list[dict[str, float]], t: Thresholds, val_size: int | None = None) -> dict[str, float]:
    """The quantities the rules compare with thresholds (NaN where the history is too short), and
    the effective limits on validation-accuracy changes (the thresholds, raised to the sampling noise
    of accuracy on ``val_size`` images)."""
    train_loss, val_acc, val_loss = (_series(history, k) for k in ("train_loss", "val_acc", "val_loss"))
    nan = math.nan
    m: dict[str, float] = {"epochs": len(history)}
    m["val_acc_noise"] = noise = val_acc_noise(val_acc, val_size, t.val_noise_z)
    m["osc_acc_drop"], m["osc_big_drop"] = max(t.osc_acc_drop, noise), max(t.osc_big_drop, noise)
    m["overfit_acc_drop"] = max(t.overfit_acc_drop, noise)
    m["final_val_acc"] = val_acc[-1] if val_acc else nan
    train_acc = _series(history, "train_acc")
    m["final_train_acc"] = train_acc[-1] if train_acc else nan
    m["generalization_gap"] = m["final_train_acc"] - m["final_val_acc"]
    m["best_val_acc"] = max(val_acc) if val_acc else nan
    m["best_val_epoch"] = val_acc.index(max(val_acc)) + 1 if val_acc else nan
    m["val_acc_drop_from_peak"] = max(val_acc) - val_acc[-1] if val_acc else nan
    m["val_loss_rise_from_min"] = val_loss[-1] / min(val_loss) - 1 if val_loss and min(val_loss) > 0 else nan
    # Averaged over `window` epochs (fewer in a run shorter than twice that), so that one low epoch
    # does not set the minimum that the end is compared with.
    span = max(1, min(t.window, len(val_loss) // 2))
    means = [sum(val_loss[i:i + span]) / span for i in range(len(val_loss) - span + 1)]
    m["val_loss_span"] = span
    m["val_loss_rise_averaged"] = means[-1] / min(means) - 1 if means and min(means) > 0 else nan
    m["val_loss_rise_averaged_nats"] = means[-1] - min(means) if means else nan
    drops = [a - b for a, b in zip(val_acc, val_acc[1:])]
    m["val_acc_drops"] = sum(d >= m["osc_acc_drop"] and d > 0 for d in drops)  # > 0: a flat curve never falls
    m["max_val_acc_drop"] = max((d for d in drops if d > 0), default=0.0)  # 0: it never fell
    m["max_val_acc_drop_epoch"] = (drops.index(m["max_val_acc_drop"]) + 2  # the epoch it fell in
                                   if m["max_val_acc_drop"] > 0 else nan)
    first_drop = next((i for i, d in enumerate(drops) if d >= m["osc_acc_drop"] and d > 0), len(drops))
    m["val_acc_recoveries"] = sum(-d >= m["osc_acc_drop"] and d < 0 for d in drops[first_drop + 1:])
    m["max_train_loss_rise"] = max(train_loss_rises(history, t).values(), default=0.0)
    events = instabilities(history, t, m)
    unstable = [event.epoch for event in events]
    m["instabilities"] = len(events)
    m["instabilities_together"] = max((sum(e <= g <= e + t.window for g in unstable) for e in unstable), default=0)
    m["unrecovered_instabilities"] = sum(not event.recovered for event in events)
    m["instabilities_persist"] = float(m["instabilities_together"] >= t.osc_min_drops or (
        m["instabilities"] >= t.osc_min_drops and m["instabilities"] * t.osc_spike_epochs > m["epochs"]))
    m["final_train_loss"] = train_loss[-1] if train_loss else nan
    m["max_step_loss"] = max(_series(history, "train_loss_max"), default=nan)
    initial = _series(history[:1], "train_loss_initial")
    m["start_loss"] = max([math.log(10), *initial])
    m["blowup_loss"] = t.loss_blowup * m["start_loss"]
    recent = train_loss[-1 - t.window:]
    m["recent_train_loss_rises"] = sum(b - a >= t.osc_min_loss_rise and b > a for a, b in zip(recent, recent[1:]))
    m["recent_train_loss_changes"] = max(len(recent) - 1, 0)  # the epoch-to-epoch changes those rises are among
    m["train_loss_above_best"] = train_loss[-1] / min(train_loss) - 1 if train_loss and min(train_loss) > 0 else nan
    # Fall of the train loss per epoch over the last `window` epochs; with a single epoch, from the
    # loss of uniform guessing, ln(10).
    w = min(t.window, len(train_loss) - 1)
    start = train_loss[-1 - w] if w >= 1 else math.log(10)
    m["recent_loss_drop"] = (start - train_loss[-1]) / max(w, 1) if train_loss else nan
    peak = int(m["best_val_epoch"]) - 1 if val_acc else -1
    min_val_loss_epoch = val_loss.index(min(val_loss)) if val_loss else -1
    m["best_val_loss_epoch"] = min_val_loss_epoch + 1 if val_loss else nan
    ref = min(peak, min_val_loss_epoch) if peak >= 0 and min_val_loss_epoch >= 0 else max(peak, min_val_loss_epoch)
    # How much the generalisation gap (train accuracy - val accuracy) grew since the val accuracy peak.
    gaps = [(float(r["val_acc"]), float(r["train_acc"]) - float(r["val_acc"])) for r in history
            if finite_number(r.get("val_acc")) and finite_number(r.get("train_acc"))]
    top = max(range(len(gaps)), key=lambda i: gaps[i][0]) if gaps else -1
    m["gap_growth_since_val_peak"] = gaps[-1][1] - gaps[top][1] if gaps else nan
    m["train_loss_change_since_val_peak"] = (train_loss[-1] / train_loss[ref] - 1
                                             if 0 <= ref < len(train_loss) and train_loss[ref] > 0 else nan)
    return m


def epoch_of(row: dict[str, float], place: int) -> int:
    """The row's ``epoch`` when it is a whole number, else its place in the history (from 1)."""
    epoch = row.get("epoch")
    return int(epoch) if finite_number(epoch) and float(epoch).is_integer() else place + 1


# Measures of the falls, rises and instabilities: the run's, kept when the later rules read the measures
# of the run without its transient spikes.
SPIKE_MEASURES = ("val_acc_drops", "max_val_acc_drop", "max_val_acc_drop_epoch", "val_acc_recoveries",
                  "max_train_loss_rise", "instabilities", "instabilities_together", "unrecovered_instabilities",
                  "instabilities_persist")


def finite_series(history: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of the rows whose ``key`` is finite (:func:`epoch_of`)."""
    rows = [(epoch_of(row, i), _float(row.get(key))) for i, row in enumerate(history)]
    return [(epoch, value) for epoch, value in rows if math.isfinite(value)]


def counted_rise(before: float, after: float, t: Thresholds) -> bool:
    """Whether the training loss going from ``before`` to ``after`` is a rise that counts
    (``>= osc_min_loss_rise`` nats)."""
    return 0 < before < after and after - before >= t.osc_min_loss_rise


def train_loss_rises(history: list[dict[str, float]], t: Thresholds) -> dict[int, float]:
    """The epoch-to-epoch rises of the training loss that count (:func:`counted_rise`), relative, by the
    epoch they rose into."""
    rows = finite_series(history, "train_loss")
    return {epoch: b / a - 1 for (_, a), (epoch, b) in zip(rows, rows[1:]) if counted_rise(a, b, t)}


@dataclass
class Instability:
    """An epoch in which validation accuracy fell by ``>= osc_acc_drop`` (``fall``) or the training
    loss rose by ``>= osc_loss_rise`` and ``>= osc_min_loss_rise`` nats (``rise``, relative, in epoch
    ``rise_epoch``: the same one, or the next when a spike at an epoch's end lowered its validation
    accuracy and raised the next epoch's mean loss), or both; ``recovered``: a later epoch climbed
    back (accuracy to within ``osc_acc_drop`` of where it fell from, the loss to within
    ``osc_loss_rise`` of where it rose from)."""

    epoch: int
    fall: float | None
    rise: float | None
    rise_epoch: int | None
    recovered: bool


def instabilities(history: list[dict[str, float]], t: Thresholds, m: dict[str, float]) -> list[Instability]:
    """The run's :class:`Instability` epochs, in order (``m``: the effective accuracy limits of :func:`measure`)."""
    limit = m["osc_acc_drop"]
    events: dict[int, Instability] = {}
    val = finite_series(history, "val_acc")
    for i in range(1, len(val)):
        (_, before), (epoch, after) = val[i - 1], val[i]
        if before - after >= limit and before > after:
            back = any(v >= before - limit for _, v in val[i + 1:])
            events[epoch] = Instability(epoch, before - after, None, None, back)
    loss = finite_series(history, "train_loss")
    for i in range(1, len(loss)):
        (_, before), (epoch, after) = loss[i - 1], loss[i]
        if counted_rise(before, after, t) and after / before - 1 >= t.osc_loss_rise:
            back = any(v <= before * (1 + t.osc_loss_rise) for _, v in loss[i + 1:])
            fell = events.get(epoch)
            if fell is None and (previous := events.get(epoch - 1)) is not None and previous.rise is None:
                fell = previous  # the same spike: it ended epoch - 1 and raised this epoch's mean loss
            at = fell.epoch if fell else epoch
            events[at] = Instability(at, fell.fall if fell else None, after / before - 1, epoch,
                                     back and (fell.recovered if fell else True))
    return [events[epoch] for epoch in sorted(events)]


def last_epoch_instability(history: list[dict[str, float]], t: Thresholds, m: dict[str, float]) -> str | None:
    """What made the run's last epoch unstable, in words, or None: validation accuracy fell there (an
    :class:`Instability`), or the tracked sharpness went over the optimizer's stability threshold in it. No
    later epoch can show whether the run recovers."""
    if len(history) < 2:
        return None
    final, row = epoch_of(history[-1], len(history) - 1), history[-1]
    said = [f"val_acc fell {e.fall:.3f}" for e in instabilities(history, t, m) if e.epoch == final and e.fall]
    sharpness, threshold = _float(row.get("sharpness_max")), _float(row.get("threshold_last"))
    if sharpness > threshold:  # (NaN compares false)
        said.append(f"sharpness went up to {sharpness:.3g} against {threshold:.3g}")
    return f"in epoch {final}, its last, " + " and ".join(said) if said else None


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def edge_of_stability(
    m: dict[str, float], curvature: dict[str, Any] | None, diverged_at_step: int | None
) -> str | None:
    """The tracked sharpness against the optimizer's stability threshold, in words (None when the
    run did not track it); adds the numbers to the measures ``m``."""
    if not curvature:
        return None
    what = "preconditioned sharpness" if curvature.get("preconditioned") else "sharpness"
    if not curvature.get("measurements"):  # tracked, but the run ended before its first measurement
        return (f"{what} not measured: the run ended before its first measurement" if diverged_at_step is None else
                f"{what} not measured: the first non-finite loss, gradient or weight came at step {diverged_at_step}, "
                f"before the first measurement")
    threshold = curvature.get("threshold_formula") or "its stability threshold"
    step = curvature.get("first_crossing_step")
    m["sharpness_max"] = _float(curvature.get("sharpness_max"))
    m["sharpness_first_crossing_step"] = _float(step)
    m["crossing_sharpness"] = _float(curvature.get("crossing_sharpness"))
    m["crossing_threshold"] = _float(curvature.get("crossing_threshold"))
    # Where tracking began after step 0 (log_spaced_start off) a blow-up may predate every measurement.
    start = curvature.get("initial_step")
    since = f"from step {start}" if isinstance(start, (int, float)) and start > 0 else ""
    if step is None and not math.isfinite(m["sharpness_max"]):  # e.g. the one measurement, of non-finite weights
        text = (f"{what} not measured: none of its {curvature['measurements']} measurement(s)"
                f"{' ' + since if since else ''} was finite")
    elif step is None:
        levels = {row[2] for row in curvature.get("series") or []}
        level = f" = {_float(levels.pop()):.3g}" if len(levels) == 1 else ""  # one threshold throughout
        text = (f"{what} stayed below {threshold}{level} in all {curvature['measurements']} measurements"
                f"{' ' + since if since else ''} (largest {m['sharpness_max']:.3g})")
    else:
        text = (f"{what} {m['crossing_sharpness']:.3g} crossed {threshold} = {m['crossing_threshold']:.3g} "
                f"at step {step}" + (f" (measured {since})" if since else ""))
    if diverged_at_step is not None:
        text += f"; first non-finite loss, gradient or weight at step {diverged_at_step}"
        m["crossing_lead_steps"] = diverged_at_step - step if step is not None else math.nan
    return text


def _spikes(history: list[dict[str, float]], events: list[Instability]) -> str:
    """Recovered instabilities in words, each with its epoch's largest step loss and sharpness."""
    rows = {epoch_of(row, i): row for i, row in enumerate(history)}

    def facts(epoch: int) -> str:
        row = rows.get(epoch, {})
        said = [f"largest step loss {row['train_loss_max']:.3g}"] if row.get("train_loss_max") is not None else []
        if row.get("sharpness_max") is not None:
            said.append(f"sharpness up to {row['sharpness_max']:.3g} against {_float(row.get('threshold_last')):.3g}")
        return f"in epoch {epoch}" + (f" ({', '.join(said)})" if said else "")

    said = []
    for event in events:
        fell = f"val_acc fell {event.fall:.3f}" if event.fall is not None else ""
        rose = f"train loss rose {event.rise:+.1%}" if event.rise is not None else ""
        if fell and rose and event.rise_epoch != event.epoch:
            said.append(f"{fell} {facts(event.epoch)} and {rose} {facts(int(event.rise_epoch))}")
        else:
            said.append(f"{' and '.join(filter(None, (fell, rose)))} {facts(event.epoch)}")
    what = "one transient spike" if len(said) == 1 else f"{len(said)} transient spikes"
    return f"{what}: " + "; ".join(said) + (" and recovered" if len(said) == 1 else ", each time recovered")


def _limit(m: dict[str, float], t: Thresholds, name: str) -> str:
    """The effective limit ``name`` in words: the threshold, or val_acc's sampling noise where that is larger."""
    if m[name] > getattr(t, name):
        return f"{m[name]:.3g} (val_acc's sampling noise on this validation set, larger than {name} {getattr(t, name)})"
    return f"{m[name]:.3g}"


# What the rules read of an epoch's row; a run's summary.json epochs hold the first two.
ROW_KEYS = ("train_loss", "val_acc", "val_loss", "train_acc", "train_loss_max", "train_loss_initial")


def check_history(history: Any) -> None:
    """A TypeError or ValueError unless ``history`` is a list of per-epoch rows (mappings) whose values for
    :data:`ROW_KEYS` are numbers or None (not measured, as a key a row lacks, or NaN), some row holding
    ``train_loss`` and some ``val_acc``: without any, a run would be judged as one that learned nothing."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise TypeError(f"history: {type(history).__name__} is not allowed; expected a list of per-epoch rows (dicts)")
    for i, row in enumerate(history):
        if not isinstance(row, Mapping):
            raise TypeError(f"history[{i}]: {type(row).__name__} is not allowed; expected a dict of the epoch's values")
        for key in ROW_KEYS:
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"history[{i}][{key!r}]: {value!r} is not allowed; expected a number or None")
    missing = [key for key in ROW_KEYS[:2] if history and not any(key in row for row in history)]
    if missing:
        raise ValueError(f"history: no epoch row holds {' or '.join(missing)} (its keys: {sorted(history[0])}); a "
                         "run's summary.json epochs hold train_loss and val_acc")


def diagnose(history: list[dict[str, float]], diverged: bool = False, thresholds: Thresholds | None = None,
             diverged_at_step: int | None = None, curvature: dict[str, Any] | None = None,
             val_size: int | None = None, passes: float | None = None) -> Diagnosis:
    """Label a run from its per-epoch rows (``train_loss``, ``val_acc``, ``val_loss``, ...); no label (None)
    for a run that neither diverged nor finished an epoch.

    ``diverged_at_step`` and ``curvature`` (the run's sharpness record: ``measurements``,
    ``sharpness_max``, ``first_crossing_step``, ``crossing_sharpness``, ``crossing_threshold``,
    ``threshold_formula``, ``preconditioned``) only add evidence: to a diverging or oscillating label, and to
    another whose step loss rose short of a blow-up.
    ``val_size``: the number of validation images, which sets the sampling noise of accuracy changes
    (None: unknown, the thresholds apply as they are). ``passes``: how many times the run has seen
    its training images on average (see :func:`optimlab.summary.data_passes`); at most
    ``overfit_min_passes`` there is nothing to memorise and no overfit rule applies (None: unknown,
    no limit)."""
    check_history(history)
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise TypeError(f"thresholds: a {type(thresholds).__name__} is not allowed; expected Thresholds (from a "
                        "mapping: Thresholds.from_overrides)")
    if val_size is not None and not is_count(val_size):
        raise ValueError(f"Invalid val_size: {val_size!r} (must be an integer >= 1, or None: unknown)")
    if passes is not None and not (finite_number(passes) and passes >= 0):
        raise ValueError(f"Invalid passes: {passes!r} (must be a finite number >= 0, or None: unknown)")
    t = thresholds or Thresholds()
    m = measure(history, t, val_size)
    m["passes"] = math.nan if passes is None else passes
    can_memorise = passes is None or passes > t.overfit_min_passes
    one_pass = (f"the overfit rule's pattern, but each training image was seen {m['passes']:.2f} times on average "
                f"(overfit needs > {t.overfit_min_passes:g}): nothing to memorise, so the gap is the measurement's")
    edge = edge_of_stability(m, curvature, diverged_at_step)
    notes: list[str] = []  # a transient spike, cited by whichever rule then names the regime

    def verdict(regime: str, *evidence: str) -> Diagnosis:
        unstable = regime in ("diverging", "oscillating")
        if edge and unstable:
            evidence = (*evidence, edge)
        elif not unstable and m["max_step_loss"] >= (1 + t.osc_loss_rise) * m["start_loss"]:  # said why not unstable
            rose = (f"a training step's loss rose to {m['max_step_loss']:.3g}, "
                    f"{m['max_step_loss'] / m['start_loss'] - 1:.0%} "
                    f"above max(ln(10), first step's loss) = {m['start_loss']:.3g}, short of the blow-up level "
                    f"{m['blowup_loss']:.3g}")
            evidence = (*evidence, rose + (f"; {edge}" if edge else ""))
        return Diagnosis(regime, [*evidence, *notes], m)

    if diverged:
        return verdict("diverging", "a non-finite loss, gradient or weight stopped the run")
    if not history or math.isnan(m["final_val_acc"]):
        if not m["epochs"]:  # a run stopped (or crashed) before its first epoch ended: nothing to label
            return Diagnosis(None, ["no finished epoch to judge"], m)
        return verdict("diverging", "no finished epoch to judge")
    at_chance = m["final_val_acc"] <= t.chance_acc
    blowup_loss = m["blowup_loss"]
    blown_up = m["final_train_loss"] > blowup_loss
    above_best = m["train_loss_above_best"] > t.diverge_loss_rise
    rising = m["recent_train_loss_rises"] > 0
    not_falling = above_best or rising
    spiked = m["max_step_loss"] > blowup_loss  # a training step's loss blew up at some point
    spike = (f"a training step's loss reached {m['max_step_loss']:.3g} (blow-up: > {t.loss_blowup:g} x "
             f"max(ln(10), first step's loss) = {decimals(blowup_loss, 2)})")
    if at_chance and (blown_up or not_falling):
        # What fired: the loss above the blow-up level, a loss that is not falling, or both.
        loss = (f"train loss {m['final_train_loss']:.3g} {'above' if blown_up else 'not above'} the blow-up level "
                f"{decimals(blowup_loss, 2)}")
        if not_falling:
            loss += f"{', and' if blown_up else ', but'} not falling: " + ", ".join(
                [f"{m['train_loss_above_best']:+.1%} vs its best epoch (limit {t.diverge_loss_rise:.0%})"] * above_best
                + [f"{m['recent_train_loss_rises']:.0f} rise(s) in the last {m['recent_train_loss_changes']:.0f} "
                   "epoch-to-epoch change(s)"] * rising)
        return verdict("diverging", f"final val_acc {m['final_val_acc']:.3f} <= chance_acc {t.chance_acc}", loss)
    learned_bound = t.underfit_loss_ratio * math.log(10)
    if spiked and m["final_val_acc"] < t.fit_acc and not m["final_train_loss"] <= learned_bound:  # NaN: not learned
        partly = (f" (it learned in part: val_acc peaked at {m['best_val_acc']:.3f} in epoch {m['best_val_epoch']:.0f})"
                  if m["best_val_acc"] > t.chance_acc else "")
        return verdict("diverging", spike, f"and the run has not recovered: final train loss "
                       f"{m['final_train_loss']:.3g} > {t.underfit_loss_ratio} x ln(10) = {learned_bound:.2f}, "
                       f"final val_acc {m['final_val_acc']:.3f} < fit_acc {t.fit_acc}{partly}")
    if spiked and m["final_val_acc"] < t.fit_acc:
        return verdict("oscillating", spike, f"then recovered and learned (final train loss "
                       f"{m['final_train_loss']:.3g} <= {t.underfit_loss_ratio} x ln(10) = {learned_bound:.2f}) "
                       f"but fell short of a fit: final val_acc {m['final_val_acc']:.3f} < fit_acc {t.fit_acc}")
    if spiked:
        return verdict("oscillating", spike, f"then recovered and converged: final val_acc "
                       f"{m['final_val_acc']:.3f} >= fit_acc {t.fit_acc}")
    train_rise = m["max_train_loss_rise"]
    val_jumps = m["val_acc_drops"] >= t.osc_min_drops or 0 < m["max_val_acc_drop"] >= m["osc_big_drop"]
    val_worse_acc = m["val_acc_drop_from_peak"] >= m["overfit_acc_drop"]
    oscillation = (f"{m['val_acc_drops']:.0f} epoch-to-epoch val_acc drops >= {_limit(m, t, 'osc_acc_drop')} (limit "
                   f"{t.osc_min_drops}), largest {m['max_val_acc_drop']:.3f} (limit {_limit(m, t, 'osc_big_drop')}), "
                   f"{m['val_acc_recoveries']:.0f} recoveries")
    together = (f"falls of val_acc or rises of the train loss: {m['instabilities']:.0f} in {m['epochs']:.0f} epochs, "
                f"at most {m['instabilities_together']:.0f} within {t.window} epochs of each other (persisting: "
                f"{t.osc_min_drops} within {t.window} epochs, or {t.osc_min_drops} or more at over one per "
                f"{t.osc_spike_epochs} epochs)")
    persisting = bool(m["instabilities_persist"])
    if val_jumps and persisting and m["val_acc_recoveries"] >= 1 and not val_worse_acc:
        return verdict("oscillating", oscillation, f"{together}, yet converging: final val_acc "
                       f"{m['final_val_acc']:.3f} within {_limit(m, t, 'overfit_acc_drop')} of its best")
    if m["instabilities"] and not persisting and not m["unrecovered_instabilities"]:
        events = instabilities(history, t, m)
        notes.append(f"{_spikes(history, events)}; {together}: no persisting oscillation")
        # The rules below judge the run as if the spikes had not happened: on its measures with the
        # validation results of an epoch that fell, and the training loss of one that rose, held at the
        # epoch before's (a spike's validation loss would pass for overfitting, its training loss for progress).
        fell = {e.epoch for e in events if e.fall is not None}
        rose = {e.rise_epoch for e in events if e.rise_epoch is not None}
        calm = [dict(row) for row in history]
        for i in range(1, len(calm)):
            epoch = epoch_of(calm[i], i)
            held = ("val_acc", "val_loss") * (epoch in fell) + ("train_loss",) * (epoch in rose)
            calm[i].update({key: calm[i - 1].get(key) for key in held})
        m.update({k: v for k, v in measure(calm, t, val_size).items() if k not in SPIKE_MEASURES})
        val_worse_acc = m["val_acc_drop_from_peak"] >= m["overfit_acc_drop"]
        val_jumps, train_rise = False, 0.0
    train_smooth = not 0 < train_rise >= t.osc_loss_rise  # no rise at all is smooth, whatever the limit
    still_fitting = m["train_loss_change_since_val_peak"] < 0
    peak_settled = m["epochs"] - m["best_val_epoch"] >= t.overfit_min_epochs_after_peak
    val_worse_loss = (m["val_loss_rise_averaged"] >= t.overfit_loss_rise
                      and m["val_loss_rise_averaged_nats"] >= t.overfit_min_loss_rise)
    if val_worse_loss and m["final_val_acc"] >= t.fit_acc and (last := last_epoch_instability(history, t, m)):
        # A fitted run's last epoch was unstable: a validation loss over the bars with that epoch alone is that
        # instability, not a drift (experiment=cnn seed 1 at 98.57%: its sharpness over 2/lr in epoch 20 only).
        held = [dict(row) for row in history]
        held[-1]["val_loss"] = held[-2].get("val_loss")
        without = measure(held, t, val_size)
        if not (without["val_loss_rise_averaged"] >= t.overfit_loss_rise
                and without["val_loss_rise_averaged_nats"] >= t.overfit_min_loss_rise):
            val_worse_loss = False
            notes.append(f"val_loss {m['val_loss_rise_averaged']:+.1%} ({m['val_loss_rise_averaged_nats']:+.3g} nats) "
                         f"above its minimum (averaged) only with the last epoch: without it "
                         f"{without['val_loss_rise_averaged']:+.1%} ({without['val_loss_rise_averaged_nats']:+.3g} "
                         f"nats; limit {t.overfit_loss_rise:.0%} and {t.overfit_min_loss_rise} nats); {last}, an "
                         "instability no later epoch shows recovered from, not overfitting")
    memorised = m["final_train_acc"] >= t.overfit_train_acc and m["generalization_gap"] >= t.overfit_gap
    drifting = still_fitting and ((val_worse_acc and peak_settled) or val_worse_loss)
    if train_smooth and (memorised or drifting) and not can_memorise:
        notes.append(one_pass)
    elif train_smooth and memorised:
        return verdict("overfit", f"training set memorised: train_acc {m['final_train_acc']:.4f} "
                       f">= {t.overfit_train_acc}", f"val_acc {m['final_val_acc']:.4f} trails it by "
                       f"{m['generalization_gap']:.3f} (limit {t.overfit_gap})")
    elif train_smooth and drifting:
        averaged = f", averaged over {m['val_loss_span']:.0f} epochs" if m["val_loss_span"] > 1 else ""
        return verdict("overfit",
                       f"val_acc {m['val_acc_drop_from_peak']:.3f} below its peak at epoch {m['best_val_epoch']:.0f} "
                       f"(limit {_limit(m, t, 'overfit_acc_drop')}); "
                       f"val_loss {m['val_loss_rise_averaged']:+.1%} ({m['val_loss_rise_averaged_nats']:+.3g} nats) "
                       f"above its minimum{averaged} (limit {t.overfit_loss_rise:.0%} and "
                       f"{t.overfit_min_loss_rise} nats)",
                       f"train loss still falling: {m['train_loss_change_since_val_peak']:+.1%} since then")
    if val_jumps or not train_smooth:  # unstable, not converging: say first which instability fired
        fired = [f"val_acc fell >= {_limit(m, t, 'osc_acc_drop')} {m['val_acc_drops']:.0f} times"
                 if m["val_acc_drops"] >= t.osc_min_drops else
                 f"val_acc fell {m['max_val_acc_drop']:.3f} in one epoch"] * val_jumps
        fired += [f"the train loss rose {train_rise:+.1%} in one epoch"] * (not train_smooth)
        back = "; it did not climb back" if val_jumps and not m["val_acc_recoveries"] else ""
        return verdict("oscillating", f"unstable, not converging: {' and '.join(fired)}{back}", oscillation,
                       f"largest epoch-to-epoch train loss rise {train_rise:+.1%} "
                       f"(limit {t.osc_loss_rise:.0%}, rises under {t.osc_min_loss_rise} nats ignored)", together)
    if m["final_val_acc"] < t.fit_acc:
        low = f"final val_acc {m['final_val_acc']:.3f} < fit_acc {t.fit_acc}"
        # Stalled: validation accuracy and loss both stopped improving while the training set is fit
        # better and better: the training loss still falls and the gap between train and val accuracy
        # grew by more than chance. (A narrow net's val accuracy also sits still within its chance
        # level while both curves creep on together: that is no overfitting.)
        stalled = (peak_settled and m["val_loss_rise_from_min"] > 0
                   and m["train_loss_change_since_val_peak"] <= -t.overfit_stall_loss_drop
                   and m["gap_growth_since_val_peak"] > m["val_acc_noise"])
        if stalled and not can_memorise:
            if one_pass not in notes:  # rule 3's pattern may have noted it already
                notes.append(one_pass)
        elif stalled:
            return verdict("overfit", low, f"val_acc has not improved since epoch {m['best_val_epoch']:.0f} "
                           f"({m['best_val_acc']:.4f}; limit {t.overfit_min_epochs_after_peak} epochs) nor val_loss "
                           f"since epoch {m['best_val_loss_epoch']:.0f} ({m['val_loss_rise_from_min']:+.1%}) while the "
                           f"train loss fell {-m['train_loss_change_since_val_peak']:.1%} (limit "
                           f"{t.overfit_stall_loss_drop:.0%}) and train_acc - val_acc grew "
                           f"{m['gap_growth_since_val_peak']:.3f} (val_acc's sampling noise "
                           f"{m['val_acc_noise']:.3g}): more epochs fit the training set, not the task")
        span = min(t.window, int(m["epochs"]) - 1)
        rose = m["recent_loss_drop"] < 0  # a negative drop is said as a rise
        trend = (f"train loss {'rose' if rose else 'fell'} {abs(m['recent_loss_drop']):.4f} nats/epoch "
                 + (f"over the last {span} epochs" if span else
                    f"{'above' if rose else 'below'} the chance-level loss ln(10)")
                 + f" (threshold: a fall of {t.slow_min_loss_drop})")
        if m["recent_loss_drop"] >= t.slow_min_loss_drop or math.isnan(m["recent_loss_drop"]):
            return verdict("slow", low, "still improving: " + trend)
        learned = m["final_train_loss"] <= t.underfit_loss_ratio * math.log(10)
        start = (f"train loss {m['final_train_loss']:.3g} vs ln(10) = {math.log(10):.3g} for uniform guessing "
                 f"(underfit below {t.underfit_loss_ratio} x)")
        if not learned:
            return verdict("slow", low, "barely started: " + start, trend)
        return verdict("underfit", low, "plateaued: " + trend, start)
    return verdict("healthy", f"final val_acc {m['final_val_acc']:.3f} >= fit_acc {t.fit_acc}",
                   "no divergence, oscillation or overfitting rule fired")
