"""RMSprop: gradients scaled by a running root mean square, optionally centered and with momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim.base import Optimizer, ParamsT, check_range, foreach_into, zeros_state, zeros_step


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, 2012), numerically identical to ``torch.optim.RMSprop``.

    With gradient :math:`g_t` (negated if ``maximize``, plus ``weight_decay * theta``)::

        v_t     <- alpha * v_{t-1} + (1 - alpha) * g_t^2
        gbar_t  <- alpha * gbar_{t-1} + (1 - alpha) * g_t           (centered)
        d_t     <- sqrt(v_t - gbar_t^2) + eps   (centered)   or   sqrt(v_t) + eps
        b_t     <- momentum * b_{t-1} + g_t / d_t;  theta_t <- theta_{t-1} - lr * b_t   (momentum > 0)
        theta_t <- theta_{t-1} - lr * g_t / d_t                                          (otherwise)

    State: ``step`` (float32 CPU tensor), ``square_avg``, ``momentum_buffer`` (momentum > 0),
    ``grad_avg`` (centered).

    Differences from the notebooks: TensorFlow's ``RMSPropOptimizer`` and the numpy notebook put
    epsilon *inside* the square root (``sqrt(v + eps)``) and use ``alpha`` ("decay", "beta") 0.9;
    PyTorch adds eps outside and defaults to ``alpha=0.99``. TF1 also starts ``v`` at 1, not 0.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 maximize: bool = False, grad_noise_std: float = 0.0) -> None:
        check_range("alpha", alpha, 0.0, 1.0)
        check_range("eps", eps, 0.0)
        check_range("momentum", momentum, 0.0)
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize, grad_noise_std=grad_noise_std)
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
        torch._foreach_mul_(square_avgs, alpha)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
        out = self._scratch(params, "denom")
        if group["centered"]:
            grad_avgs = zeros_state(states, "grad_avg", params)
            torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
            avg = foreach_into(out, torch._foreach_addcmul, torch.addcmul, square_avgs, grad_avgs, grad_avgs, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = foreach_into(out, torch._foreach_sqrt, torch.sqrt, square_avgs)
        torch._foreach_add_(avg, group["eps"])
        if group["momentum"] > 0:
            bufs = zeros_state(states, "momentum_buffer", params)
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_addcdiv_(bufs, grads, avg)
            torch._foreach_add_(params, bufs, alpha=-lr)
        else:
            torch._foreach_addcdiv_(params, grads, avg, value=-lr)
