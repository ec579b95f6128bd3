"""RMSprop: gradients scaled by a running root mean square, optionally centered and with momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim.base import (Optimizer, ParamsT, add_scaled_, check_hyperparameter, check_lr, foreach_into,
                                 in_place, mul_scaled_, recorded_copies, zeros_state, zeros_step)


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, 2012), numerically identical to ``torch.optim.RMSprop``.

    With gradient :math:`g_t` (negated if ``maximize``, plus ``weight_decay * theta``)::

        v_t     <- alpha * v_{t-1} + (1 - alpha) * g_t^2
        gbar_t  <- alpha * gbar_{t-1} + (1 - alpha) * g_t           (centered)
        d_t     <- sqrt(v_t - gbar_t^2) + eps   (centered)   or   sqrt(v_t) + eps
        b_t     <- momentum * b_{t-1} + g_t / d_t;  theta_t <- theta_{t-1} - lr * b_t   (momentum > 0)
        theta_t <- theta_{t-1} - lr * g_t / d_t                                          (otherwise)

    State: ``step`` (a CPU scalar tensor), ``square_avg``, ``momentum_buffer`` (momentum > 0),
    ``grad_avg`` (centered).

    Differences from the notebooks: TensorFlow's ``RMSPropOptimizer`` and the numpy notebook put
    epsilon *inside* the square root (``sqrt(v + eps)``) and use ``alpha`` ("decay", "beta") 0.9;
    PyTorch adds eps outside and defaults to ``alpha=0.99``. TF1 also starts ``v`` at 1, not 0.

    Args:
        params: parameters or parameter groups (a group may be member-wise, see
            :class:`~optimlab.optim.Optimizer`: then ``lr`` and ``weight_decay`` may hold one value per member).
        lr: learning rate (>= 0; a number or a 1-element tensor). alpha: smoothing constant in [0, 1].
        eps: >= 0. weight_decay: L2 (>= 0; a number or a 1-element tensor). momentum: >= 0.
        centered: normalise by the estimated variance instead of the second moment.
        capturable, foreach, differentiable: torch.optim's implementation switches, accepted for
            compatibility (see base). maximize: ascend instead of descend. grad_noise_std:
            Gaussian gradient noise (see base).
    """

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float | Tensor = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, grad_noise_std: float = 0.0) -> None:
        check_lr(lr)
        check_hyperparameter("epsilon value", eps, tensor_name="eps")
        check_hyperparameter("momentum value", momentum, tensor_name="momentum")
        check_hyperparameter("weight_decay value", weight_decay, tensor_name="weight_decay")
        check_hyperparameter("alpha value", alpha, 0.0, 1.0, tensor_name="alpha")
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered, weight_decay=weight_decay,
                        capturable=capturable, foreach=foreach, maximize=maximize, differentiable=differentiable,
                        grad_noise_std=grad_noise_std)
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = zeros_step()
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]]) -> None:
        alpha, lr = group["alpha"], group["lr"]
        self._advance_steps(states)
        square_avgs = [s["square_avg"] for s in states]
        mul_scaled_(square_avgs, alpha)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
        out = self._scratch(params, "denom")
        if group["centered"]:
            grad_avgs = zeros_state(states, "grad_avg", params)
            torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
            means = recorded_copies(grad_avgs)
            variance = foreach_into(out, torch._foreach_addcmul, torch.addcmul, square_avgs, means, means, value=-1)
            avg = in_place(torch._foreach_sqrt_, torch._foreach_sqrt, variance)
        else:
            avg = foreach_into(out, torch._foreach_sqrt, torch.sqrt, square_avgs)
        avg = in_place(torch._foreach_add_, torch._foreach_add, avg, group["eps"])
        if group["momentum"] > 0:
            bufs = zeros_state(states, "momentum_buffer", params)
            mul_scaled_(bufs, group["momentum"])
            torch._foreach_addcdiv_(bufs, grads, avg)
            add_scaled_(params, bufs, -lr)
        else:
            self._addcdiv_scaled_(params, grads, avg, -lr)
