r"""Every member's sharpness at once: Lanczos with one batched Hessian-vector product per step.

The loss of a population is the sum of its members' losses and no operation mixes members, so its
Hessian over the stacked parameters is block-diagonal, one block per member. One Hessian-vector
product of the summed loss with a stacked vector ``v`` (member m's piece in slice m of every
parameter) is therefore every member's own product at once: :math:`(Hv)_m = H_m v_m`. Lanczos
runs side by side on the P blocks (:func:`optimlab.curvature.lanczos.lanczos_members`): inner products, norms and the
reorthogonalisation are per member, each member has its own tridiagonal matrix and stops on its
own tolerance, and the iteration ends when every member has stopped. A member whose product is
non-finite stops there with NaN or inf, as :func:`optimlab.curvature.lanczos` does, and nothing of
it reaches another member.

:func:`member_eigenpairs` is :func:`optimlab.curvature.top_eigenpair` for every member of a
:class:`~optimlab.population.stacked.StackedModel`: member m's value is the top eigenvalue of the
Hessian of its mean cross-entropy on its own batch (plain or preconditioned), the value its single
model gives (tested against :func:`~optimlab.curvature.sharpness` in float64).
:class:`MemberSharpness` tracks every member during population training as
:class:`~optimlab.curvature.SharpnessCallback` tracks a single run: the same probe, start vector,
schedule, preconditioner, threshold and records, for every member at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from optimlab.curvature.hessian import (evaluation, hessian_vector_product, inverse_sqrt, like_parameters, probe_batch,
                                        trainable)
from optimlab.curvature.lanczos import lanczos_members
from optimlab.curvature.stability import (GradientMoments, initial_preconditioner, moments_from_parts, preconditioner,
                                          probe_parts, stability_threshold, threshold_formula,
                                          uses_preconditioner)
from optimlab.curvature.tracking import (DEFAULT_PROBE_SIZE, DEFAULT_TRACKING_TOL, SharpnessLog, check_tracking,
                                         check_tracking_iteration, measurement_due, measurement_iters, probe_indices)
from optimlab.optim import Optimizer
from optimlab.population.data import PopulationData
from optimlab.population.stacked import StackedModel, member_losses


class MemberEigenpairs(NamedTuple):
    """Each member's top eigenvalue (``[P]``, float64), unit eigenvector (stacked like the
    parameters: member m's in slice m) and number of Hessian-vector products it used (``[P]``)."""

    values: Tensor
    vectors: list[Tensor]
    iterations: Tensor


def member_eigenpairs(model: StackedModel, x: Tensor, y: Tensor, preconditioner: Sequence[Tensor] | None = None,
                      iters: int | Sequence[int] = 20, tol: float = 1e-3, init: Sequence[Tensor] | None = None,
                      generator: torch.Generator | None = None) -> MemberEigenpairs:
    r"""Every member's :func:`~optimlab.curvature.top_eigenpair` with batched products.

    Args:
        model: the stacked members (parameters ``[P, ...]``, one dtype and device).
        x, y: member m's probe in ``x[m]`` (``[P, N, C, H, W]``) and ``y[m]`` (``[P, N]``).
        preconditioner: positive tensors shaped like the stacked parameters (member m's
            :math:`P` in slice m, e.g. a member-wise optimizer's state), or None (:math:`P = I`).
        iters, tol: per member, see :func:`optimlab.curvature.lanczos`; ``iters`` also one per member.
        init: start vectors stacked like the parameters (e.g. the previous call's, a warm start);
            None: a standard normal draw from ``generator`` (None: seeded with 0).

    A member whose probe loss is not finite (finite weights can overflow it) gets NaN, its start vector
    and 0 products, as its single model does.
    """
    params = trainable(model)
    members = model.members
    if x.dim() != 5 or x.shape[0] != members or y.shape != x.shape[:2] or x.shape[1] == 0:
        raise ValueError(f"x must be [{members}, N, C, H, W] and y [{members}, N] with N > 0, got "
                         f"{list(x.shape)} and {list(y.shape)}")
    dtype, device = params[0].dtype, params[0].device
    sizes, shapes = [p[0].numel() for p in params], [p.shape for p in params]

    def stacked_flat(tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(members, -1) for t in tensors], 1).to(device, dtype)

    scale = None
    if preconditioner is not None:
        given = like_parameters("preconditioner", preconditioner, model)
        scale = inverse_sqrt(given, stacked_flat(given))
    if init is not None:
        v0 = stacked_flat(like_parameters("init", init, model))
    else:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        v0 = torch.randn(members, sum(sizes), generator=generator, dtype=dtype).to(device)

    def unflat(v: Tensor) -> list[Tensor]:
        return [piece.reshape(shape) for piece, shape in zip(v.split(sizes, 1), shapes)]

    with evaluation(model):
        x, y = probe_batch(x, y, dtype)
        logits = model(x)
        # A member's loss is the mean over all N of its probe images: no ignored index (-100) or class probabilities.
        classes = logits.shape[-1]
        if y.is_floating_point():
            raise ValueError(f"Invalid y: class indices in [0, {classes}) required, got floating-point targets")
        outside = (y < 0) | (y >= classes)
        if bool(outside.any()):
            raise ValueError(f"Invalid y: class indices in [0, {classes}) required, got {y[outside][0].item()}")
        losses = member_losses(logits, y)
        grads = torch.autograd.grad(losses.sum(), params, create_graph=True, materialize_grads=True)
        products = hessian_vector_product(grads, params, unflat, stacked_flat, scale)
        values, vectors, iterations, _ = lanczos_members(products, v0, iters, tol)
    defined = torch.isfinite(losses.detach())
    if not bool(defined.all()):  # a loss that overflowed has no Hessian: NaN and its start vector, as top_eigenpair
        values = values.masked_fill(~defined.to(values.device), math.nan)
        vectors = torch.where(defined.view(-1, 1), vectors, v0)
        iterations = iterations.masked_fill(~defined.to(iterations.device), 0)
    return MemberEigenpairs(values, [v.detach() for v in unflat(vectors)], iterations)


def member_gradient_moments(model: StackedModel, x: Tensor, y: Tensor, batch_size: int) -> GradientMoments:
    """:func:`optimlab.curvature.gradient_moments` for every member at once (member m's probe in
    ``x[m]``, ``y[m]``, as for :func:`member_eigenpairs`), stacked like the parameters: the summed
    loss's gradient holds each member's own in its slice."""
    params = trainable(model)
    parts = probe_parts(x.shape[1], batch_size)
    with evaluation(model):
        x, y = probe_batch(x, y, params[0].dtype)
        grads = (torch.autograd.grad(member_losses(model(xb), yb).sum(), params,
                                     materialize_grads=True)
                 for xb, yb in zip(x.tensor_split(parts, 1), y.tensor_split(parts, 1)))
        return moments_from_parts(grads, x.shape[1], batch_size)


class MemberSharpness:
    """Sharpness tracking for every member of a population, as
    :class:`~optimlab.curvature.SharpnessCallback` tracks a single run (its arguments, per member).

    Member m's probe is the ``probe_size`` training examples its run's callback draws with seed
    ``seeds[m]``, its first start vector the standard normal draw its run's tracker makes from that
    seed (in the single model's parameter order, stacked), and every later one its previous
    eigenvector. Measured after the steps :func:`~optimlab.curvature.measurement_due` names (and at
    step 0 with ``log_spaced_start``) with one :func:`member_eigenpairs` call, preconditioned by the
    member-wise optimizer's state (at step 0 by its
    :func:`~optimlab.curvature.initial_preconditioner` of each member's probe in minibatches of the
    training batch size), against the threshold of each member's lr. Each member's
    :class:`~optimlab.curvature.SharpnessLog` records what its run's callback records; a member
    whose preconditioner is not positive, or whose weights had just become non-finite (its run
    measures those before it stops), gets NaN and keeps its start vector.
    """

    def __init__(self, every_n_steps: int, seeds: Sequence[int], probe_size: int = DEFAULT_PROBE_SIZE,
                 iters: int = 20, tol: float = DEFAULT_TRACKING_TOL, log_spaced_start: bool = True) -> None:
        check_tracking(every_n_steps, probe_size)
        check_tracking_iteration(iters, tol)
        self.every_n_steps, self.probe_size, self.seeds = every_n_steps, probe_size, list(seeds)
        self.iters, self.tol, self.log_spaced_start = iters, tol, log_spaced_start
        self.logs = [SharpnessLog() for _ in self.seeds]
        self.vectors: list[Tensor] | None = None
        # whose start vector is a measured eigenvector (a run's tracker.vector set)
        self.warm = [False] * len(self.seeds)
        self.probe: tuple[Tensor, Tensor] | None = None
        self.batch_size: int | None = None  # the training batch size, from setup()'s data
        self.threshold_formulas: list[str | None] = []
        self.preconditioned = False

    def setup(self, model: StackedModel, optimizer: Optimizer, data: PopulationData) -> None:
        """Draw the probes and first start vectors; read the thresholds' form (before training)."""
        if model.members != len(self.seeds):
            raise ValueError(f"{len(self.seeds)} seeds for {model.members} members")
        picks = [probe_indices(data.train_size, self.probe_size, seed).to(data.device) for seed in self.seeds]
        # Each run draws its probe by its own seed: members that share their data but not their seed
        # probe different images. The probe is [P, N, ...]: with one seed and one run of members that
        # share their data an expanded view, else copies (the probe's products take no groups).
        indices = (torch.stack([data.train_images[m, idx] for m, idx in enumerate(picks)]),
                   torch.stack([data.train_labels[m, idx] for m, idx in enumerate(picks)]))
        if len(set(self.seeds)) == 1:
            images, labels = data.gather(*indices)
            self.probe = data.per_member(images), labels
        else:
            self.probe = data.gather_rows(*indices)
        params = list(model.parameters())
        if self.vectors is None:  # not restored from a checkpoint
            single = [p.shape for p in model.template[0].parameters()]
            draws = [torch.randn(sum(math.prod(s) for s in single), generator=torch.Generator().manual_seed(seed),
                                 dtype=params[0].dtype) for seed in self.seeds]
            split = [[piece.view(s) for piece, s in zip(d.split([math.prod(s) for s in single]), single)]
                     for d in draws]
            self.vectors = [v.to(params[0].device) for v in model.stack_members(split)]
        self.preconditioned = uses_preconditioner(optimizer)
        self.batch_size = data.batch_size
        self.threshold_formulas = [threshold_formula(optimizer, lr) for lr in self.lrs(optimizer)]

    @staticmethod
    def lrs(optimizer: Optimizer) -> list[float]:
        return optimizer.param_groups[0]["lr"].tolist()

    def measures_at_start(self) -> bool:
        """Whether step 0 (the initialisation) is measured: with ``log_spaced_start``."""
        return self.log_spaced_start

    def due(self, step: int) -> bool:
        return measurement_due(step, self.every_n_steps, self.log_spaced_start)

    def measure(self, step: int, model: StackedModel, optimizer: Optimizer, members: Sequence[int],
                nan_members: Sequence[int] = ()) -> None:
        """Measure every member and record the measurement of ``members`` (and NaN for ``nan_members``)."""
        assert self.probe is not None and self.vectors is not None and self.batch_size, "setup() first"
        params = trainable(model)
        if step == 0 and self.preconditioned:
            precond = initial_preconditioner(optimizer, member_gradient_moments(model, *self.probe, self.batch_size),
                                             params)
        else:
            precond = preconditioner(optimizer, params)
        valid = torch.ones(model.members, dtype=torch.bool, device=params[0].device)
        if precond is not None:
            valid = torch.stack([(t > 0).flatten(1).all(1) for t in precond]).all(0)
            # A member without a usable preconditioner is measured with P = I and recorded as NaN.
            precond = [torch.where(valid.view(-1, *[1] * (t.dim() - 1)), t, 1.0) for t in precond]
        iters = [measurement_iters(self.iters, warm) for warm in self.warm]  # as each run's tracker
        pairs = member_eigenpairs(model, *self.probe, precond, iters, self.tol, init=self.vectors)
        values = pairs.values.tolist()
        keep = [ok and math.isfinite(v) and m not in nan_members
                for m, (ok, v) in enumerate(zip(valid.tolist(), values))]
        keep_t = torch.tensor(keep, device=params[0].device)
        self.vectors = [torch.where(keep_t.view(-1, *[1] * (new.dim() - 1)), new, old)
                        for new, old in zip(pairs.vectors, self.vectors)]
        self.warm = [warm or kept for warm, kept in zip(self.warm, keep)]
        lrs = self.lrs(optimizer)
        usable = valid.tolist()
        for m in [*members, *nan_members]:
            value = values[m] if usable[m] and m not in nan_members else math.nan
            self.logs[m].add(step, value, stability_threshold(optimizer, lr=lrs[m]))

    def start_epoch(self, epoch: int, members: Sequence[int]) -> None:
        for m in members:
            self.logs[m].start_epoch(epoch)

    def end_epoch(self, members: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Each of ``members``' record of the epoch that ended (see SharpnessLog.epoch_record)."""
        return {m: self.logs[m].end_epoch() for m in members}

    def run_record(self, m: int) -> dict[str, Any]:
        """Member m's run record, as :meth:`SharpnessCallback.run_record` gives its run's."""
        return self.logs[m].run_record(threshold_formula=self.threshold_formulas[m], preconditioned=self.preconditioned,
                                       probe_images=None if self.probe is None else self.probe[1].shape[1])

    def state_dict(self) -> dict[str, Any]:
        return {"logs": [log.state_dict() for log in self.logs], "vectors": self.vectors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for log, saved in zip(self.logs, state["logs"], strict=True):
            log.load_state_dict(saved)
        self.vectors = state["vectors"]
        # a start vector becomes an eigenvector with the first finite measurement, which the log holds
        self.warm = [any(math.isfinite(row[1]) for row in log.series) for log in self.logs]
