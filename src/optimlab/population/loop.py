"""The population training loop: P members stepped together by one member-wise optimizer.

The loss is the sum over members of each member's mean cross-entropy, so member m's gradient is
exactly the gradient its own run computes (the sum's derivative with respect to each member's loss
is 1). One optimizer with a member-wise group (``members: P``, ``lr`` and ``weight_decay`` one per
member) applies every member's own update.

Isolation. A member whose loss or gradient is non-finite (the single run's check: the loss plus the
sum of its gradients), or whose weights are non-finite after the update, is frozen at its last
finite weights and recorded with the step and reason its own run would record (see
:class:`~optimlab.divergence.DivergenceGuard`): the single run looks at its weights only every
``weights_every`` steps and after an epoch's last step, and otherwise meets them as the next
step's non-finite loss, at the same step number. Freezing sets the member's weights back to its
last finite ones after every step (:meth:`PopulationLoop.keep_finite`), so whatever the optimizer
computed for that member (NaN state included) never reaches its weights, and since every operation
is per member, never another member. On a GPU the finite flags stay on the device; they are read
once per epoch, never per step (no host sync per step; with sharpness tracking, also at each
measurement). On the CPU, where a read costs nothing, the freezing reads them every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor

from optimlab.checks import finite_number, is_count
from optimlab.curvature import epoch_columns
from optimlab.divergence import LOSS_OR_GRADIENT, WEIGHTS, finite_rows, norm_rows, sum_rows
from optimlab.optim import Optimizer
from optimlab.population.best import MemberBest
from optimlab.population.curvature import MemberSharpness
from optimlab.population.data import PopulationData
from optimlab.population.module import fit
from optimlab.population.schedule import MemberSchedules
from optimlab.population.stopping import MemberEarlyStopping
from optimlab.population.stacked import StackedDropout, StackedModel, member_losses
from optimlab.record import synchronize

REASONS = {1: LOSS_OR_GRADIENT, 2: WEIGHTS}  # device codes -> the single run's divergence reasons


@dataclass
class MemberRecord:
    """One member's run as its own run would record it: per-epoch rows (``epoch``, ``train_loss``,
    ``train_acc``, ``train_loss_max``, ``train_loss_initial`` in epoch 1, ``val_loss``, ``val_acc``,
    ``test_loss``/``test_acc`` when tested, ``train_time_s`` of the whole population's epoch) and
    where it diverged. Its history ends with the epoch in which it diverged, as a single run stops."""

    history: list[dict[str, float]] = field(default_factory=list)
    diverged_at_step: int | None = None
    divergence_reason: str | None = None
    curvature: dict[str, Any] | None = None  # the sharpness record, when tracked (see MemberSharpness)
    train_steps: list[dict[str, float]] = field(default_factory=list)  # as RunSummary.train_steps

    @property
    def diverged(self) -> bool:
        return self.diverged_at_step is not None


class StepMetrics:
    """Each member's training metrics over an epoch's steps, as :class:`~optimlab.record.RunRecord` sums a
    run's: every step's losses, correct predictions, batch size and whether each member's update was applied,
    kept as they come (three copies a step, on the device) and summed at the epoch's end."""

    def __init__(self, members: int, steps: int, device: torch.device) -> None:
        self.losses = torch.empty(steps, members, dtype=torch.float64, device=device)
        self.correct = torch.empty(steps, members, dtype=torch.long, device=device)
        self.applied = torch.empty(steps, members, dtype=torch.bool, device=device)
        self.sizes: list[int] = []

    def clear(self) -> None:
        self.sizes = []

    def add(self, losses: Tensor, correct: Tensor, applied: Tensor, size: int) -> None:
        """One step's ``[P]`` losses, correct predictions and applied flags, of batches of ``size``."""
        step = len(self.sizes)
        if step == len(self.losses):  # stepped on past an epoch's steps without closing it: room for as many again
            self.losses, self.correct, self.applied = (torch.cat([t, t.new_empty(max(1, len(t)), t.shape[1])])
                                                       for t in (self.losses, self.correct, self.applied))
        self.losses[step], self.correct[step], self.applied[step] = losses, correct, applied
        self.sizes.append(size)

    def totals(self) -> dict[str, Tensor]:
        """``[P]`` float64 each, over the steps whose update was applied: ``loss_sum`` (of loss x batch size),
        ``correct``, ``count`` (images), ``loss_max`` (-inf without a step) and ``steps``."""
        steps = len(self.sizes)
        applied, losses = self.applied[:steps], self.losses[:steps]
        sizes = torch.tensor(self.sizes, dtype=torch.float64, device=losses.device).unsqueeze(1)
        loss_max = torch.where(applied, losses, -math.inf).amax(0) if steps else \
            torch.full(applied.shape[1:], -math.inf, dtype=torch.float64, device=losses.device)
        return {"loss_sum": torch.where(applied, losses * sizes, 0.0).sum(0),
                "correct": torch.where(applied, self.correct[:steps], 0).sum(0).double(),
                "count": (applied * sizes).sum(0), "loss_max": loss_max, "steps": applied.sum(0).double()}


def member_optimizer(cls: type[Optimizer], model: StackedModel, lr: Tensor | Sequence[float] | float,
                     weight_decay: Tensor | Sequence[float] | float = 0.0, **options: Any) -> Optimizer:
    """``cls`` (one of optimlab.optim's) over ``model``'s parameters as one member-wise group:
    member m with ``lr[m]`` and ``weight_decay[m]`` (float64 tensors on the model's device, where
    the optimizer uses them without a copy) and the shared ``options``. A weight decay that is 0 for
    every member is the number 0, as in the members' own runs: a per-member tensor counts as nonzero
    unread (reading it would synchronise a GPU), and its zeros would cost a pass over every
    parameter each step (4 ms of a 12.5 ms SGD step at width 2048 with 6 members, measured)."""
    device = next(model.parameters()).device

    def per_member(name: str, value: Tensor | Sequence[float] | float) -> Tensor:
        if isinstance(value, (bool, str)):
            raise ValueError(f"{name}: {value!r} is not allowed; expected a number, or one per member")
        values = torch.as_tensor(value, dtype=torch.float64)
        if values.dim() == 0:
            values = torch.full((model.members,), float(values), dtype=torch.float64)
        if values.shape != (model.members,):  # a tensor of one would broadcast to every member
            raise ValueError(f"{name}: {len(values)} value(s) for {model.members} members; expected one per member, "
                             "or one number for all")
        return values.to(device)

    decay = per_member("weight_decay", weight_decay)
    no_decay = not isinstance(weight_decay, Tensor) and not bool(decay.any())
    group = {"params": list(model.parameters()), "members": model.members, "lr": per_member("lr", lr),
             "weight_decay": 0.0 if no_decay else decay}
    return cls([group], **options)


class PopulationLoop:
    """Trains ``model``'s members with ``optimizer`` on ``data``, one batched step at a time.

    Args:
        model: the stacked members (its dtype is the training dtype; images are cast per batch,
            as Lightning's ``64-true`` precision casts a single run's batches).
        optimizer: a member-wise optimizer over exactly ``model.parameters()`` (:func:`member_optimizer`).
            Its ``grad_noise_std`` must be 0: its draws would come from torch's global generator,
            not each member's (pass the noise as ``grad_noise_std`` here).
        data: the members' data, on the model's device.
        weights_every: each member's cadence of the single run's check of its updated weights
            (``trainer.log_every_n_steps``); one number for all, or one per member.
        sharpness: tracks every member's sharpness (``curvature.every_n_steps``), or None.
        schedules: the members' learning-rate schedulers (``scheduler``), stepped after every epoch, or None.
        clip: ``(trainer.gradient_clip_val, trainer.gradient_clip_algorithm)``: each member's gradients
            clipped as Lightning clips its run's (:func:`clip_member_gradients`), or None.
        stopping: every member's early stopping (``callbacks=early_stopping``), checked after every epoch, or None.
        grad_noise_std: the optimizer's ``grad_noise_std``: Gaussian noise of that standard deviation
            added to each gradient before the update, member m's drawn from ``model.generators[m]``
            as its run's optimizer draws it (:func:`add_member_noise`); CPU only.
        best: every member's best checkpoint (``callbacks.model_checkpoint``), chosen after every epoch's
            validation, for a test of the best epoch's weights (``test_ckpt=best``), or None.
    """

    def __init__(self, model: StackedModel, optimizer: Optimizer, data: PopulationData,
                 weights_every: int | Sequence[int] = 50, sharpness: MemberSharpness | None = None,
                 schedules: MemberSchedules | None = None, clip: tuple[float, str] | None = None,
                 stopping: MemberEarlyStopping | None = None, grad_noise_std: float = 0.0,
                 best: MemberBest | None = None) -> None:
        params = list(model.parameters())
        groups = optimizer.param_groups
        if len(groups) != 1 or groups[0].get("members") != model.members or \
                {id(p) for p in groups[0]["params"]} != {id(p) for p in params}:
            raise ValueError(f"the optimizer must have one member-wise group (members: {model.members}) holding "
                             "exactly the model's parameters; build it with member_optimizer()")
        if groups[0].get("grad_noise_std", 0.0):
            raise ValueError("the optimizer's grad_noise_std must be 0 in a population (its draws are not per "
                             "member); pass it to the loop as grad_noise_std")
        if data.members != model.members:
            raise ValueError(f"{data.members} members' data for {model.members} model members")
        if not (finite_number(grad_noise_std) and grad_noise_std >= 0):
            raise ValueError(f"grad_noise_std: {grad_noise_std!r} is not allowed; expected a finite number >= 0")
        if clip is not None and not (isinstance(clip, Sequence) and not isinstance(clip, str) and len(clip) == 2
                                     and finite_number(clip[0]) and clip[0] > 0 and clip[1] in ("value", "norm")):
            raise ValueError(f"clip: {clip!r} is not allowed; expected (a finite number > 0, 'value' or 'norm')")
        self.model, self.optimizer, self.data, self.params = model, optimizer, data, params
        self.dtype, device = params[0].dtype, params[0].device
        self.grad_noise_std = grad_noise_std
        if self.draws and device.type != "cpu":
            raise ValueError("dropout and gradient noise in a population run on the CPU only (each member's draws "
                             "follow its CPU generator, as its run's draws on the CPU do)")
        # add_member_noise's buffers, reused: fresh parameter-sized ones each step page-fault in (see optim's _scratch)
        self._noise = [torch.empty_like(p) for p in params] if grad_noise_std else None
        members = model.members
        self.last_finite = [p.detach().clone() for p in params]
        self.alive = torch.ones(members, dtype=torch.bool, device=device)
        self.diverged_at = torch.full((members,), -1, dtype=torch.long, device=device)
        self.reason = torch.zeros(members, dtype=torch.long, device=device)
        every = list(weights_every) if isinstance(weights_every, Sequence) else [weights_every] * members
        if len(every) != members or not all(map(is_count, every)):
            raise ValueError(f"weights_every: {weights_every!r}; expected an integer >= 1, or one per member")
        self.weights_every = torch.tensor(every, device=device)
        self.log_every, self._cadences = every, sorted(set(every))  # the per-step scalars' cadence, as the run's
        self._logged_steps: list[tuple[int, Tensor]] = []  # this epoch's, on the device until its end
        self.flags_on_host = device.type == "cpu"  # reading the flags costs nothing there (see keep_finite)
        self.clip, self.stopping, self.best = clip, stopping, best
        self.schedules = schedules
        if schedules is not None:  # the lr each scheduler set when it was built (a warm-up's first)
            schedules.set(groups[0]["lr"])
        self.sharpness = sharpness
        if sharpness is not None:
            sharpness.setup(model, optimizer, data)
        self._nobody = torch.zeros(members, dtype=torch.bool, device=device)
        self._overflowed = self._nobody
        # Members an update took to non-finite weights: those weights, which their runs keep and
        # evaluate (NaN logits); the member itself stays frozen at its last finite ones. On the CPU
        # copied when it happens; on a GPU (no host read per step) a torch.where into a copy of the
        # weights each step, and who overflowed read with the epoch's flags (:meth:`run_weights`).
        self._run_weights: dict[int, list[Tensor]] = {}
        self._overflow_weights: list[Tensor] | None = None  # the GPU's copy, made at its first step
        self._ever_overflowed = torch.zeros(members, dtype=torch.bool, device=device)
        self.global_step = 0
        self.epochs_done = 0
        self.records = [MemberRecord() for _ in range(members)]
        self._step_metrics = StepMetrics(members, data.steps_per_epoch, device)
        self._initial_loss: Tensor | None = None
        self._epoch_started = 0.0  # the open epoch's clock and who was training at its start (start_epoch)
        self._started_alive = self.alive.clone()

    def state_dict(self) -> dict[str, Any]:
        """Everything the next epoch depends on, after a finished epoch: weights, optimizer state, the
        on-device flags, the step and epoch counts, the members' records and schedulers. Not the last finite
        weights: after every step they are the weights (:meth:`keep_finite`). Each member's generator
        state (its dropout masks and gradient noise; its epoch order comes from its seed and the
        epoch number)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "alive": self.alive, "diverged_at": self.diverged_at,
                "reason": self.reason, "global_step": self.global_step, "epochs_done": self.epochs_done,
                "records": [dataclasses.asdict(record) for record in self.records],
                # copies: on a GPU the run weights are views of a copy of every member's weights, all saved
                "run_weights": {m: [w.clone() for w in weights] for m, weights in self.run_weights().items()},
                "sharpness": None if self.sharpness is None else self.sharpness.state_dict(),
                "schedules": None if self.schedules is None else self.schedules.state_dict(),
                "stopping": None if self.stopping is None else self.stopping.state_dict(),
                "best": None if self.best is None else self.best.state_dict(),
                "generators": [generator.get_state() for generator in self.model.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state`` (tensors on this loop's device): the next
        :meth:`fit` starts with epoch ``epochs_done`` and computes what the uninterrupted loop would."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for last, p in zip(self.last_finite, self.params):
            last.copy_(p.detach())
        self.alive, self.diverged_at, self.reason = state["alive"], state["diverged_at"], state["reason"]
        self.global_step, self.epochs_done = state["global_step"], state["epochs_done"]
        self._run_weights = {}
        self._ever_overflowed.zero_()
        for m, weights in (state.get("run_weights") or {}).items():  # absent from checkpoints before 2026-12-05
            self.keep_run_weights(m, weights)
        # In place: callers may hold the list (the launcher's reports read it).
        self.records[:] = [MemberRecord(**record) for record in state["records"]]
        if self.sharpness is not None:
            self.sharpness.load_state_dict(state["sharpness"])
        if self.schedules is not None:
            self.schedules.load_state_dict(saved_part(state, "schedules"), self.optimizer.param_groups[0]["lr"])
        if self.stopping is not None:
            self.stopping.load_state_dict(saved_part(state, "stopping"))
        if self.best is not None:
            self.best.load_state_dict(saved_part(state, "best"))
        if self.draws:
            for generator, saved in zip(self.model.generators, saved_part(state, "generators"), strict=True):
                generator.set_state(saved)

    @property
    def draws(self) -> bool:
        """Whether training draws at random (dropout, gradient noise): the members' generators then matter."""
        return bool(self.grad_noise_std) or any(isinstance(layer, StackedDropout) and layer.p > 0
                                                for layer in self.model.modules())

    def end_epoch(self, epochs_done: int) -> None:
        """Called by :meth:`finish_epoch` once an epoch's rows are in the records; subclasses save or report here."""

    def member_views(self, flags: Tensor) -> Iterator[Tensor]:
        """``flags [P]`` shaped to broadcast over each parameter."""
        for p in self.params:
            yield flags.view((-1,) + (1,) * (p.dim() - 1))

    def keep_finite(self, alive: Tensor) -> None:
        """The ``alive`` members' weights become their last finite ones; the others' weights are set
        back to theirs. On a GPU one ``torch.where`` per parameter (no host sync); on the CPU
        (``flags_on_host``), copies of the runs of alive and of frozen members (at width 2048 the
        where took 21 ms a step for six members, the copy 9 ms)."""
        if not self.flags_on_host:
            for p, finite, keep in zip(self.params, self.last_finite, self.member_views(alive)):
                torch.where(keep, p.detach(), finite, out=finite)
                p.detach().copy_(finite)
            return
        start = 0
        for is_alive, run in itertools.groupby(alive.tolist()):
            stop = start + len(list(run))
            for p, finite in zip(self.params, self.last_finite):
                source, target = (p.detach(), finite) if is_alive else (finite, p.detach())
                target[start:stop].copy_(source[start:stop])
            start = stop

    def input_groups(self, images: Tensor) -> list[int] | None:
        """The runs of members ``images`` holds one batch for (the data's ``input_groups``), or None
        when it holds one per member."""
        return None if images.shape[0] == self.model.members else self.data.input_groups

    def step(self, x: Tensor, y: Tensor, last: bool = False) -> Tensor:
        """One training step on every member's batch (``x [P, B, ...]``, or one per run of members that
        share their data as the data gathers them; ``y [P, B]``; ``last``: the epoch's last); returns
        the members' losses ``[P]``. Members frozen before or in this step keep their last finite weights."""
        logits = self.model(x.to(self.dtype), self.input_groups(x))
        losses = member_losses(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        losses = losses.detach()
        grads = [p.grad for p in self.params]
        # The single run's check per member: non-finite when the loss or any gradient is (or their sum overflows).
        check = losses + sum_rows(*grads)
        if self.clip is not None:  # after the check, as the runs clip
            clip_member_gradients(grads, *self.clip)
        logged = any(self.global_step % n == 0 for n in self._cadences)
        grad_norms = norm_rows(*grads) if logged else None  # before the noise: a run logs its gradient's norm
        if self._noise is not None:
            add_member_noise(grads, self.model.generators, self.grad_noise_std,
                             self.optimizer.param_groups[0].get("maximize", False), self._noise)
        self.optimizer.step()
        grads_ok, weights_ok = torch.isfinite(check), self.finite_weights()
        applied = self.alive & grads_ok  # the members whose update was applied, as their runs apply it
        if grad_norms is not None:
            self.log_step(losses, grad_norms, applied)
        alive = applied & weights_ok
        # On the CPU the flags are read for free, and a step in which no member stops skips recording a stop.
        if not self.flags_on_host or bool((alive != self.alive).any()):
            self.record_stops(alive, grads_ok, weights_ok, last)
        else:
            self._overflowed = self._nobody
        self.keep_finite(alive)
        # The epoch's training metrics count the steps whose update was applied, as RunRecord does.
        self._step_metrics.add(losses, (logits.detach().argmax(2) == y).sum(1), applied, y.shape[1])
        if self.global_step == 0:  # a refused first step has no initial loss, as in RunRecord
            self._initial_loss = torch.where(applied, losses.double(), math.nan)
        self.alive = alive
        self.global_step += 1
        return losses

    def record_stops(self, alive: Tensor, grads_ok: Tensor, weights_ok: Tensor, last: bool) -> None:
        """Record the members this step stops (alive before, not ``alive`` now): where and why, and the
        non-finite weights an update took a member to (its run keeps them; the member keeps its last finite ones)."""
        overflowed = self.alive & grads_ok & ~weights_ok  # updated into non-finite weights: its run keeps them
        if not self.flags_on_host:
            for p, kept, flag in zip(self.params, self.overflow_copy(), self.member_views(overflowed)):
                torch.where(flag, p.detach(), kept, out=kept)
            self._ever_overflowed |= overflowed
        elif bool(overflowed.any()):
            for m in members(overflowed):
                self.keep_run_weights(m, [p.detach()[m] for p in self.params])
        newly = self.alive & ~alive
        # A refused step (loss or gradient) is recorded at its own step; non-finite weights after
        # the update at the next one, as the single run's guard records them, and as weights only
        # where the single run looks at them (else its next step's loss is what it sees).
        self.diverged_at = torch.where(newly, torch.where(grads_ok, self.global_step + 1, self.global_step),
                                       self.diverged_at)
        weights_seen = (self.global_step % self.weights_every == 0) | last
        self.reason = torch.where(newly, torch.where(grads_ok & weights_seen, 2, 1), self.reason)
        self._overflowed = overflowed  # its run still measures them

    def finite_weights(self) -> Tensor:
        """``[P]`` bools: whether every weight of each member is finite. On a GPU the element-wise
        check (:func:`~optimlab.divergence.finite_rows`; no host read). On the CPU first one pass of
        sums, non-finite for a member when any of its weights is (or when the sum overflows, which
        finite weights near the float32 limit can do), then the element-wise check only when some
        sum was non-finite: the same answer for half the reading (30 width-512 members, one thread,
        AMD EPYC: 1.6-1.7 ms against 3.3-4.0 ms a step)."""
        weights = [p.detach() for p in self.params]
        if self.flags_on_host:
            sums = sum_rows(*weights).isfinite()
            if bool(sums.all()):
                return sums
        return finite_rows(*weights)

    def log_step(self, losses: Tensor, grad_norms: Tensor, applied: Tensor) -> None:
        """Keep this step's per-step scalars of every member (the updated weights' norm taken before
        any member is frozen, as its run logs them); :meth:`fit` reads them at the epoch's end."""
        lr = self.optimizer.param_groups[0]["lr"]
        self._logged_steps.append((self.global_step, torch.stack([
            losses.double(), grad_norms, norm_rows(*(p.detach() for p in self.params)),
            lr.to(losses.device, torch.float64), applied.double()])))

    def record_logged_steps(self) -> None:
        """Each member's per-step rows of this epoch: at its own cadence, for the steps whose update
        was applied (a run logs no refused step)."""
        logged, self._logged_steps = self._logged_steps, []
        if not logged:
            return
        values = torch.stack([v for _, v in logged]).tolist()
        for (step, _), (loss, grad_norm, weight_norm, lr, applied) in zip(logged, values):
            for m, record in enumerate(self.records):
                if applied[m] and step % self.log_every[m] == 0:
                    record.train_steps.append({"step": step, "loss": loss[m], "grad_norm": grad_norm[m],
                                               "weight_norm": weight_norm[m], "lr": lr[m]})

    def start_epoch(self) -> None:
        """Open epoch ``epochs_done`` (0-based): its clock and metrics, and at the very start the
        sharpness of the initialisation when tracked."""
        self._epoch_started = time.perf_counter()
        if self.sharpness is not None:
            self.sharpness.start_epoch(self.epochs_done, members(self.alive))
            if self.global_step == 0 and self.sharpness.measures_at_start():
                self.sharpness.measure(0, self.model, self.optimizer, members(self.alive))
        self._started_alive = self.alive.clone()
        self._step_metrics.clear()

    def train_step(self, x: Tensor, y: Tensor, last: bool = False) -> None:
        """:meth:`step`, then the members' sharpness when a measurement is due."""
        self.step(x, y, last)
        if self.sharpness is not None and self.sharpness.due(self.global_step):
            self.sharpness.measure(self.global_step, self.model, self.optimizer, members(self.alive),
                                   members(self._overflowed))

    def keep_run_weights(self, m: int, weights: Sequence[Tensor]) -> None:
        """Keep ``weights`` (member m's slice of every parameter) as the weights member m's run holds."""
        if self.flags_on_host:
            self._run_weights[m] = [w.clone() for w in weights]
        else:
            for kept, w in zip(self.overflow_copy(), weights):
                kept[m].copy_(w)
            self._ever_overflowed[m] = True

    def overflow_copy(self) -> list[Tensor]:
        """The GPU's copy of the weights members were updated into (made at first use)."""
        if self._overflow_weights is None:
            self._overflow_weights = [torch.zeros_like(p.detach()) for p in self.params]
        return self._overflow_weights

    def run_weights(self) -> dict[int, list[Tensor]]:
        """The members an update took to non-finite weights, with those weights (a host read on a GPU)."""
        if self.flags_on_host:
            return self._run_weights
        return {m: [kept[m] for kept in self.overflow_copy()] for m in members(self._ever_overflowed)}

    @contextlib.contextmanager
    def weights_of_the_runs(self, instead: Mapping[int, Sequence[Tensor]] | None = None) -> Iterator[None]:
        """For the block, each member holds the weights its run would: a member updated into non-finite
        weights holds those (:meth:`run_weights`) instead of its last finite ones; a member in ``instead``
        the weights given there."""
        run_weights = {**self.run_weights(), **(instead or {})}
        kept = {m: [p.detach()[m].clone() for p in self.params] for m in run_weights}
        try:
            for m, weights in run_weights.items():
                for p, w in zip(self.params, weights):
                    p.detach()[m].copy_(w)
            yield
        finally:
            for m, weights in kept.items():
                for p, w in zip(self.params, weights):
                    p.detach()[m].copy_(w)

    @torch.no_grad()
    def evaluate(self, batches: Iterator[tuple[Tensor, Tensor]], shared: bool = False,
                 instead: Mapping[int, Sequence[Tensor]] | None = None) -> Tensor:
        """``[3, P]``: each member's mean cross-entropy (batch means weighted by batch size, as the
        single run's SampleMean, summed in float64), accuracy, and the mean cross-entropy summed in the
        training dtype, as a run's SampleMean sums it (what its early stopping compares), over
        ``batches``, with the weights its run evaluates (:meth:`weights_of_the_runs`; a member in
        ``instead``: the weights given there, e.g. its best checkpoint's); ``shared``: one batch for all members."""
        training = self.model.training
        self.model.eval()  # no dropout, as Lightning evaluates a run
        try:
            with self.weights_of_the_runs(instead):
                return self._evaluate(batches, shared)
        finally:
            self.model.train(training)

    def _evaluate(self, batches: Iterator[tuple[Tensor, Tensor]], shared: bool) -> Tensor:
        members = self.model.members
        loss_sum = correct = count = run_sum = 0
        for x, y in batches:
            if shared:
                x, y = x.expand(members, *x.shape), y.expand(members, *y.shape)
            logits = self.model(x.to(self.dtype), self.input_groups(x))
            batch = y.shape[1]
            losses = member_losses(logits, y)
            loss_sum = loss_sum + losses.double() * batch
            run_sum = run_sum + losses * batch
            correct = correct + (logits.argmax(2) == y).sum(1).double()
            count += batch
        return torch.stack([loss_sum / count, correct / count, (run_sum / count).double()])

    def fit(self, epochs: int, test_every_epoch: bool = False,
            callbacks: Sequence[L.Callback] = ()) -> list[MemberRecord]:
        """Train up to ``epochs`` epochs in a Lightning Trainer (:func:`optimlab.population.module.fit`,
        with ``callbacks``); after each, evaluate every member still running at its start on its
        validation set (and on the test set when asked) and add its row to its record. A loop
        restored by :meth:`load_state_dict` continues with epoch ``epochs_done``."""
        if not is_count(epochs):
            raise ValueError(f"epochs: {epochs!r} is not allowed; expected an integer >= 1")
        fit(self, epochs, test_every_epoch, callbacks)
        return self.records

    def finish_epoch(self, test_every_epoch: bool = False) -> bool:
        """Close the epoch after its last step: evaluate, add each member's row, then
        :meth:`end_epoch`. False when no member was training at its start (nothing recorded) or none is
        left training (all diverged or stopped early): the fit stops."""
        epoch, started_alive = self.epochs_done, self._started_alive
        self.record_logged_steps()
        trained = self._step_metrics.totals()
        synchronize(started_alive.device)
        train_time = time.perf_counter() - self._epoch_started
        val_loss, val_acc, val_loss_run = self.evaluate(self.data.val_batches())
        columns = {**trained, "val_loss": val_loss, "val_acc": val_acc, "val_loss_run": val_loss_run,
                   "started_alive": started_alive.double(),
                   "diverged_at": self.diverged_at.double(), "reason": self.reason.double()}
        if test_every_epoch:
            columns["test_loss"], columns["test_acc"], _ = self.evaluate(self.data.test_batches(every_epoch=True),
                                                                         shared=True)
        if epoch == 0:
            columns["initial"] = self._initial_loss
        # The one read of the epoch: every member's metrics and finite flags together.
        values = dict(zip(columns, torch.stack(list(columns.values())).tolist()))
        tracked = {} if self.sharpness is None else self.sharpness.end_epoch(members(started_alive))
        stopped = []  # members whose early stopping ends their training here, as it ends their runs
        run_weights = self.run_weights() if self.best is not None else {}
        for m, record in enumerate(self.records):
            if values["started_alive"][m]:
                record.history.append(self._row(epoch, values, m, train_time))
                if self.best is not None:
                    self.best.update(m, values[self.best.key][m], int(values["steps"][m]),
                                     run_weights.get(m) or [p.detach()[m] for p in self.params])
                if m in tracked:
                    record.curvature = self.sharpness.run_record(m)  # type: ignore[union-attr]
                    record.history[-1].update(epoch_columns(tracked[m]))
                if values["diverged_at"][m] >= 0:
                    record.diverged_at_step = int(values["diverged_at"][m])
                    record.divergence_reason = REASONS[int(values["reason"][m])]
                elif self.stopping is not None and self.stopping.stops(m, values):
                    stopped.append(m)
        if not any(values["started_alive"]):
            return False
        if stopped:
            self.alive[stopped] = False
        if self.schedules is not None:  # after the epoch, as the runs step theirs
            self.schedules.step(self.optimizer.param_groups[0]["lr"])
        self.epochs_done = epoch + 1
        self.end_epoch(self.epochs_done)
        return bool(self.alive.any())

    @staticmethod
    def _row(epoch: int, values: dict[str, list[float]], m: int, train_time: float) -> dict[str, float]:
        """Member m's history row, with RunRecord's keys."""
        count = values["count"][m]
        row = {"epoch": epoch + 1, "train_loss": math.nan, "train_acc": math.nan}
        if count:
            row.update(train_loss=values["loss_sum"][m] / count, train_acc=values["correct"][m] / count,
                       train_loss_max=values["loss_max"][m])
        if "initial" in values and math.isfinite(values["initial"][m]):
            row["train_loss_initial"] = values["initial"][m]
        for key in ("val_loss", "val_acc", "test_loss", "test_acc"):
            if key in values:
                row[key] = values[key][m]
        row["train_time_s"] = train_time
        return row


def saved_part(state: dict[str, Any], name: str) -> Any:
    """``state[name]``, which a loop with that part needs (a ``state_dict`` of a loop without it holds None)."""
    if not state.get(name):
        raise ValueError(f"the state holds no {name} for this loop's")
    return state[name]


def clip_member_gradients(grads: Sequence[Tensor], value: float, algorithm: str) -> None:
    """Clip each member's gradients (``grads``: one ``[P, ...]`` per parameter) in place as Lightning
    clips a run's (``trainer.gradient_clip_val`` and ``gradient_clip_algorithm``, by
    ``torch.nn.utils.clip_grad_value_`` or ``clip_grad_norm_``): ``value``: every element into
    [-value, value]; ``norm``: scaled by min(1, value / (norm + 1e-6)), the member's norm taken as
    ``clip_grad_norm_`` takes it (each gradient's norm, then the norm of those, in the parameters' order;
    row-wise the same bits on the CPU, tested). Nothing crosses members."""
    if algorithm == "value":
        for g in grads:
            g.clamp_(min=-value, max=value)
        return
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grads])  # [parameters, P]
    total = torch.linalg.vector_norm(norms.t().contiguous(), dim=1)
    scale = torch.clamp(value / (total + 1e-6), max=1.0)  # clip_grad_norm_'s expression, member-wise
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1)))


def add_member_noise(grads: Sequence[Tensor], generators: Sequence[torch.Generator], std: float,
                     maximize: bool = False, noise: Sequence[Tensor] | None = None) -> None:
    """Add Gaussian noise of standard deviation ``std`` to each member's gradients in place (``grads``:
    one ``[P, ...]`` per parameter, in the parameters' order), member m's drawn from ``generators[m]``
    as its run's optimizer draws it from torch's global generator (a standard normal draw shaped like
    each gradient, in order) and added as it adds it (``grad + std * draw``, one rounding). With
    ``maximize`` the noise is subtracted: the optimizer then negates the sum, where a run negates its
    gradient before adding the noise, and ``-(g - s*n)`` rounds as ``-g + s*n`` does. ``noise``: buffers
    shaped like ``grads`` for the draws (None: fresh ones)."""
    noise = noise if noise is not None else [torch.empty_like(g) for g in grads]
    for m, generator in enumerate(generators):
        for draw in noise:
            draw[m].normal_(generator=generator)
    torch._foreach_add_(list(grads), list(noise), alpha=-std if maximize else std)


def members(flags: Tensor) -> list[int]:
    """The members whose flag is set (a host read)."""
    return [m for m, flag in enumerate(flags.tolist()) if flag]


def train_population(model: StackedModel, optimizer: Optimizer, data: PopulationData,
                     epochs: int) -> list[MemberRecord]:
    """Train the population ``epochs`` epochs; one :class:`MemberRecord` per member."""
    return PopulationLoop(model, optimizer, data).fit(epochs)
