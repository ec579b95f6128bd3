r"""What an optimizer makes stable: the sharpness at which its update becomes unstable on a quadratic
(:func:`stability_threshold`), and the diagonal preconditioner :math:`P` its update divides by, read from
its state (:func:`preconditioner`) or, at initialisation, the one its state settles to while the minibatch
gradients keep their distribution (:func:`initial_preconditioner` from :func:`gradient_moments`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimlab import optim
from optimlab.checks import is_count
from optimlab.curvature.hessian import check_batch, check_targets, evaluation, probe_batch, trainable


_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((optim.SGD, torch.optim.SGD), "sgd"),
    ((optim.Adam, torch.optim.Adam, torch.optim.AdamW), "adam"),
    ((optim.RMSprop, torch.optim.RMSprop), "rmsprop"),
    ((optim.Adagrad, torch.optim.Adagrad), "adagrad"),
)


def _kind(optimizer: torch.optim.Optimizer) -> str:
    for classes, kind in _KINDS:
        if isinstance(optimizer, classes):
            return kind
    raise TypeError(f"no stability threshold or preconditioner known for {type(optimizer).__name__}: "
                    "supported are SGD, Adam (AdamW), RMSprop and Adagrad, optimlab's or torch.optim's")


def uses_preconditioner(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s update divides by a preconditioner (Adam, RMSprop, Adagrad; not SGD)."""
    return _kind(optimizer) != "sgd"


def _momentum(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"Invalid momentum: {value!r} (the stability threshold is derived for 0 <= momentum < 1)")
    return value


def stability_threshold(optimizer: torch.optim.Optimizer, group: int = 0, lr: float | None = None) -> float:
    r"""The sharpness above which ``optimizer``'s update (param group ``group``, its current
    hyperparameters; ``lr`` instead of the group's, e.g. one member's of a member-wise group)
    diverges on a quadratic, with the preconditioner held fixed.

    On :math:`L = \tfrac{1}{2}\lambda\theta^2` (an eigendirection of :math:`P^{-1/2} H P^{-1/2}` for
    the adaptive methods), with learning rate :math:`\eta`:

    * SGD: :math:`2/\eta` (Cohen et al., 2021).
    * SGD, heavy-ball momentum :math:`\beta` (torch's form, dampening :math:`\tau`: the effective
      step is :math:`\eta(1-\tau)`): :math:`(2 + 2\beta) / ((1-\tau)\eta)` (the boundary of the
      heavy-ball iteration's stable region; Cohen et al., 2021, appendix).
    * SGD, Nesterov (torch's form, :math:`\theta \leftarrow \theta - \eta(g + \beta b)`): the
      iteration's characteristic polynomial has a root at :math:`-1` when
      :math:`\eta\lambda = 2(1 + \beta)/(1 + 2\beta)`, so :math:`(2 + 2\beta)/((1 + 2\beta)\eta)`
      (1.36/lr at 0.9; the heavy-ball formula would say 3.8/lr).
    * Adam (AdamW): :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)`, 38/lr at :math:`\beta_1 = 0.9`
      (Cohen et al., 2022; the first moment is an EMA, i.e. heavy-ball momentum with step
      :math:`(1-\beta_1)\eta`, once the bias correction has decayed).
    * RMSprop: :math:`2/\eta`; with momentum :math:`m`: :math:`(2 + 2m)/\eta`.
    * Adagrad: :math:`2/\eta_t` with the step size of the next update,
      :math:`\eta_t = \eta / (1 + t \cdot \text{lr\_decay})` after :math:`t` steps.

    Weight decay is not included (L2 decay adds ``weight_decay`` to the curvature the update sees;
    :func:`sharpness` measures the cross-entropy alone). ``lr`` may be a tensor; ``lr == 0`` gives
    ``inf``. Momentum must be in [0, 1); ``maximize`` (gradient ascent) is refused.
    """
    kind = _kind(optimizer)
    groups = len(optimizer.param_groups)
    if isinstance(group, bool) or not isinstance(group, numbers.Integral) or not 0 <= group < groups:
        raise ValueError(f"Invalid group: {group!r} (the optimizer has {groups} param groups)")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (numbers.Real, Tensor))):
        raise ValueError(f"Invalid lr: {lr!r} (must be a number, or None: the group's)")
    g = optimizer.param_groups[group]
    if g.get("maximize"):  # ascent on L is descent on -L, whose top curvature is -(H's lowest eigenvalue)
        raise ValueError(f"no stability threshold for maximize=True (param group {group}): the threshold is a "
                         "descent's, against the Hessian's top eigenvalue")
    lr = float(g["lr"] if lr is None else lr)
    if not 0 <= lr < math.inf:
        raise ValueError(f"Invalid lr: {lr!r} (must be a finite number >= 0)")
    if kind == "sgd":
        beta, damp = _momentum(g["momentum"]), g["dampening"]
        if beta == 0:
            factor, step = 2.0, lr
        elif g["nesterov"]:
            factor, step = (2 + 2 * beta) / (1 + 2 * beta), lr
        else:
            factor, step = 2 + 2 * beta, lr * (1 - damp)
    elif kind == "adam":
        beta1 = g["betas"][0]
        factor, step = 2 + 2 * beta1, lr * (1 - beta1)
    elif kind == "rmsprop":
        factor, step = 2 + 2 * _momentum(g["momentum"]), lr
    else:
        steps = [float(optimizer.state[p]["step"]) for p in g["params"] if "step" in optimizer.state.get(p, {})]
        factor, step = 2.0, lr / (1 + max(steps, default=0.0) * g["lr_decay"])
    return factor / step if step > 0 else math.inf


def threshold_formula(optimizer: torch.optim.Optimizer, lr: float) -> str | None:
    """The stability threshold in words at learning rate ``lr`` (e.g. ``2/lr``, ``38/lr``), or None
    where it is zero or infinite. Adagrad with ``lr_decay`` steps by a decayed lr, which its group's ``lr``
    does not hold: ``2/lr_t (lr_t = lr/(1+t*lr_decay))``."""
    scaled = stability_threshold(optimizer, lr=lr) * lr
    if not 0 < scaled < math.inf:
        return None
    if _kind(optimizer) == "adagrad" and float(optimizer.param_groups[0]["lr_decay"]) != 0:
        return "2/lr_t (lr_t = lr/(1+t*lr_decay))"  # whatever t its state is at (a resumed run)
    return f"{scaled:.3g}/lr"


def _with_groups(optimizer: torch.optim.Optimizer,
                 params: Iterable[Tensor] | None) -> list[tuple[int, Tensor, dict[str, Any]]]:
    """``(index, parameter, its param group)`` for ``params`` (None: every parameter, in group
    order); a ValueError for a parameter the optimizer does not hold or a complex one."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if isinstance(params, Tensor) or (isinstance(params, nn.Module) and not isinstance(params, nn.ParameterList)):
        raise ValueError(f"Invalid params: a {type(params).__name__}; expected an iterable of parameters, e.g. "
                         "list(model.parameters())")
    params = [p for g in optimizer.param_groups for p in g["params"]] if params is None else list(params)
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(f"Invalid params: item {i} is a {type(p).__name__}, not a tensor")
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not optimized by {type(optimizer).__name__}")
        if p.is_complex():
            raise ValueError(f"parameter {i} is complex: no real diagonal preconditioner")
        out.append((i, p, group))
    return out


def preconditioner(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> list[Tensor] | None:
    r"""The diagonal :math:`P` that ``optimizer``'s last update divided the (momentum) gradient
    by, read from its state; None for SGD (:math:`P = I`).

    * Adam: :math:`\sqrt{v_t / (1 - \beta_2^t)} + \epsilon` with :math:`v` = ``exp_avg_sq``
      (``max_exp_avg_sq`` with amsgrad), computed as the update does
      (``sqrt(v) / sqrt(1 - beta2^t) + eps``).
    * RMSprop: :math:`\sqrt{v} + \epsilon` (``square_avg``); centered:
      :math:`\sqrt{v - \bar g^2} + \epsilon` (``grad_avg``).
    * Adagrad: :math:`\sqrt{\text{sum}} + \epsilon`.

    Args:
        optimizer: one of optimlab's or torch.optim's SGD / Adam / AdamW / RMSprop / Adagrad (the
            two share their state keys).
        params: return :math:`P` for these parameters, in this order (matched by identity, e.g. a
            model's trainable parameters); None: every parameter of every group, in group order.

    Raises:
        ValueError: a parameter is not in the optimizer, or an adaptive optimizer has no state for
            it yet (no update has divided by a preconditioner before the first step; Adagrad's
            state exists from construction).
    """
    kind = _kind(optimizer)
    if kind == "sgd":
        return None
    out = []
    for i, p, group in _with_groups(optimizer, params):
        state = optimizer.state.get(p, {})
        step = float(state["step"]) if "step" in state else 0.0
        if kind == "adam" and step >= 1:
            v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
            out.append(v.sqrt().div_((1 - group["betas"][1] ** step) ** 0.5).add_(group["eps"]))
        elif kind == "rmsprop" and step >= 1:
            v = state["square_avg"]
            if group["centered"]:
                v = torch.addcmul(v, state["grad_avg"], state["grad_avg"], value=-1)
            out.append(v.sqrt().add_(group["eps"]))
        elif kind == "adagrad" and "sum" in state:
            out.append(state["sum"].sqrt().add_(group["eps"]))
        else:
            raise ValueError(f"{type(optimizer).__name__} has no state for parameter {i} (shape {tuple(p.shape)}) "
                             "yet: its preconditioner exists after the first step that updates it")
    return out


def probe_parts(n: int, batch_size: int) -> int:
    """Into how many parts of near-equal size :func:`gradient_moments` splits ``n`` probe examples:
    one per ``batch_size`` (rounded up), and at least two (a variance needs two), at most ``n``."""
    if not is_count(batch_size):
        raise ValueError(f"Invalid batch_size: {batch_size!r} (must be an integer >= 1)")
    if n < 1:
        raise ValueError(f"Invalid n: {n!r} (need at least one example)")
    return min(n, max(2, -(-n // batch_size)))


class GradientMoments(NamedTuple):
    r"""Element-wise estimates, for the gradient :math:`g_B` of a minibatch of ``batch_size`` drawn
    from a probe, of its mean square :math:`E[g_B^2]` and its variance :math:`\mathrm{Var}[g_B]`,
    shaped like the parameters (see :func:`gradient_moments`)."""

    square: list[Tensor]
    variance: list[Tensor]
    batch_size: int


def moments_from_parts(part_grads: Iterable[Sequence[Tensor]], examples: int, batch_size: int) -> GradientMoments:
    r""":class:`GradientMoments` for minibatches of ``batch_size`` from the gradients of the K
    near-equal parts that ``examples`` probe examples were split into (``part_grads``: one list of
    tensors per part). With part size :math:`b = n / K`, the parts' mean :math:`\bar g` and
    unbiased variance :math:`s^2` (which estimates :math:`V / b`, :math:`V` the per-example
    variance): :math:`\mathrm{Var}[g_B] = s^2 b / B` and :math:`E[g_B^2] = \max(\bar g^2 - s^2 / K, 0)
    + s^2 b / B` (:math:`\bar g^2 - s^2/K` estimates the squared mean without bias). One part (one
    example): no variance, NaN."""
    sums: list[Tensor] = []
    squares: list[Tensor] = []
    parts = 0
    for grads in part_grads:
        if not parts:
            sums, squares = [torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads]
        parts += 1
        for total, total_sq, g in zip(sums, squares, grads, strict=True):
            total.add_(g)
            total_sq.addcmul_(g, g)
    if not parts:
        raise ValueError("moments_from_parts needs the gradients of at least one part")
    size = examples / parts
    square, variance = [], []
    for total, total_sq in zip(sums, squares):
        mean = total / parts
        spread = ((total_sq / parts - mean * mean) * (parts / (parts - 1))).clamp_(min=0) if parts > 1 \
            else torch.full_like(mean, math.nan)
        noise = spread * (size / batch_size)
        variance.append(noise)
        square.append((mean * mean - spread / parts).clamp_(min=0).add_(noise) if parts > 1 else mean * mean)
    return GradientMoments(square, variance, batch_size)


def gradient_moments(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> GradientMoments:
    r"""What an adaptive optimizer's gradient averages estimate at ``model``'s current weights when
    it trains on minibatches of ``batch_size`` drawn from ``(x, y)``: the element-wise mean square
    :math:`E[g_B^2]` (it includes the minibatch noise, so it grows as ``batch_size`` shrinks) and
    variance of the minibatch gradient :math:`g_B` of the mean cross-entropy, shaped like the
    trainable parameters.

    Every example counts: ``(x, y)`` is split into :func:`probe_parts` consecutive parts of
    near-equal size, each part's gradient taken, and :func:`moments_from_parts` scales their spread
    to ``batch_size`` (so a probe smaller than a minibatch works too). In eval mode, as
    :func:`top_eigenpair` (no draw from torch's generators, ``p.grad`` untouched)."""
    params = trainable(model)
    check_batch(x, y)
    parts = probe_parts(x.shape[0], batch_size)

    def gradient(xb: Tensor, yb: Tensor) -> tuple[Tensor, ...]:
        logits = model(xb)
        check_targets(logits, yb)
        return torch.autograd.grad(F.cross_entropy(logits, yb), params, materialize_grads=True)

    with evaluation(model):
        x, y = probe_batch(x, y, params[0].dtype)
        grads = (gradient(xb, yb) for xb, yb in zip(x.tensor_split(parts), y.tensor_split(parts)))
        return moments_from_parts(grads, x.shape[0], batch_size)


def initial_preconditioner(optimizer: torch.optim.Optimizer, moments: GradientMoments,
                           params: Iterable[Tensor] | None = None) -> list[Tensor] | None:
    r"""The diagonal :math:`P` of :func:`preconditioner` that ``optimizer`` (its hyperparameters,
    not its state) reaches while its minibatch gradients keep the distribution they have at
    initialisation, estimated by ``moments`` (see :func:`gradient_moments`); None for SGD. This
    gives the preconditioned sharpness at step 0, where the state holds no :math:`P` yet, or only
    the first minibatch's, a noisy one (a coordinate that minibatch did not touch gets
    :math:`P = \epsilon` while the probe's Hessian curves along it).

    * Adam (and amsgrad): :math:`\sqrt{E[g_B^2]} + \epsilon`, what the bias-corrected average
      :math:`\hat v` estimates.
    * RMSprop: :math:`\sqrt{E[g_B^2]} + \epsilon`, where its (not bias-corrected) average settles;
      centered: :math:`\sqrt{\mathrm{Var}[g_B]} + \epsilon`.
    * Adagrad: :math:`\sqrt{a + E[g_B^2]} + \epsilon` with ``initial_accumulator_value`` :math:`a`,
      the expected accumulator of its first update (it only grows after).

    Weight decay is left out, as in :func:`stability_threshold`. The moments are in the order of
    ``params`` (None: every parameter, in group order).
    """
    kind = _kind(optimizer)
    if kind == "sgd":
        return None
    entries = _with_groups(optimizer, params)
    square, variance = list(moments.square), list(moments.variance)
    if len(square) != len(entries) or len(variance) != len(entries):
        raise ValueError(f"the moments must hold one tensor per parameter ({len(entries)}), "
                         f"got {len(square)} and {len(variance)}")
    out = []
    for (i, p, group), sq, var in zip(entries, square, variance):
        if sq.shape != p.shape or var.shape != p.shape:
            raise ValueError(f"the moments of parameter {i} must be shaped {tuple(p.shape)}")
        if kind == "rmsprop" and group["centered"]:
            v = var
        elif kind == "adagrad":
            v = sq + group["initial_accumulator_value"]
        else:
            v = sq
        out.append(v.sqrt().add_(group["eps"]))
    return out
