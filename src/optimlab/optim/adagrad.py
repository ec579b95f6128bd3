"""Adagrad: per-coordinate learning rates from the running sum of squared gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim.base import Optimizer, ParamsT, check_range, foreach_into, zeros_step


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al., 2011), numerically identical to ``torch.optim.Adagrad``.

    With gradient :math:`g_t` (negated if ``maximize``, plus ``weight_decay * theta``)::

        step    <- step + 1
        gamma_t <- lr / (1 + (step - 1) * lr_decay)
        sum_t   <- sum_{t-1} + g_t^2                     (sum_0 = initial_accumulator_value)
        theta_t <- theta_{t-1} - gamma_t * g_t / (sqrt(sum_t) + eps)

    State: ``step`` (float32 CPU tensor), ``sum``; created at construction, as torch.optim does,
    and like torch.optim every group's ``sum`` starts at the *constructor's*
    ``initial_accumulator_value`` (a per-group value is stored but does not change the start).

    Differences from the TensorFlow notebook's TF1 formulation (``tf.train.AdagradOptimizer``):
    TF starts the accumulator at ``initial_accumulator_value=0.1`` (PyTorch: 0) and divides by
    ``sqrt(sum)`` with no epsilon (PyTorch adds ``eps=1e-10`` *outside* the square root). To
    reproduce TF, pass ``initial_accumulator_value=0.1, eps=0``.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, maximize: bool = False,
                 grad_noise_std: float = 0.0) -> None:
        check_range("lr_decay", lr_decay, 0.0)
        check_range("initial_accumulator_value", initial_accumulator_value, 0.0)
        check_range("eps", eps, 0.0)
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps,
                        maximize=maximize, grad_noise_std=grad_noise_std)
        super().__init__(params, defaults)
        for group in self.param_groups:  # eager state, so state_dict() matches torch.optim's before any step
            for p in group["params"]:
                self._state_for(p, group)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = zeros_step()
        init = self.defaults["initial_accumulator_value"]  # torch.optim ignores a per-group value here
        if p.is_complex():  # the accumulator of the real and of the imaginary part
            init = complex(init, init)
        state["sum"] = torch.full_like(p, init, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]]) -> None:
        steps = self._advance_steps(states)
        sums = [s["sum"] for s in states]
        minus_clr = [-group["lr"] / (1 + (step - 1) * group["lr_decay"]) for step in steps]
        torch._foreach_addcmul_(sums, grads, grads, value=1)
        std = foreach_into(self._scratch(params, "denom"), torch._foreach_sqrt, torch.sqrt, sums)
        torch._foreach_add_(std, group["eps"])
        torch._foreach_addcdiv_(params, grads, std, minus_clr)
