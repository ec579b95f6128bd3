"""Adagrad: per-coordinate learning rates from the running sum of squared gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim.base import (Optimizer, ParamsT, check_hyperparameter, check_lr, foreach_into, in_place, scalar,
                                 zeros_step)


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al., 2011), numerically identical to ``torch.optim.Adagrad``.

    With gradient :math:`g_t` (negated if ``maximize``, plus ``weight_decay * theta``)::

        step    <- step + 1
        gamma_t <- lr / (1 + (step - 1) * lr_decay)
        sum_t   <- sum_{t-1} + g_t^2                     (sum_0 = initial_accumulator_value)
        theta_t <- theta_{t-1} - gamma_t * g_t / (sqrt(sum_t) + eps)

    State: ``step`` (a CPU scalar tensor), ``sum``; created at construction, as torch.optim does,
    and like torch.optim every group's ``sum`` starts at the *constructor's*
    ``initial_accumulator_value`` (a per-group value is stored but does not change the start).

    Differences from the TensorFlow notebook's TF1 formulation (``tf.train.AdagradOptimizer``):
    TF starts the accumulator at ``initial_accumulator_value=0.1`` (PyTorch: 0) and divides by
    ``sqrt(sum)`` with no epsilon (PyTorch adds ``eps=1e-10`` *outside* the square root). To
    reproduce TF, pass ``initial_accumulator_value=0.1, eps=0``.

    Args:
        params: parameters or parameter groups (a group may be member-wise, see
            :class:`~optimlab.optim.Optimizer`: then ``lr`` and ``weight_decay`` may hold one value per member).
        lr: learning rate (>= 0; a number or a 1-element tensor). lr_decay: >= 0.
        weight_decay: L2 (>= 0; a number or a 1-element tensor). initial_accumulator_value: >= 0.
        eps: >= 0. foreach, differentiable, fused: torch.optim's implementation switches, accepted
            for compatibility (see base). maximize: ascend instead of descend. grad_noise_std:
            Gaussian gradient noise (see base).

    Sparse gradients are supported, as in torch.optim (not with ``weight_decay``): the update
    touches only the entries the gradient holds.
    """

    supports_sparse_grads = True
    fused_sparse_error = "`fused` does not support sparse grad or complex param"

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-2, lr_decay: float = 0,
                 weight_decay: float | Tensor = 0, initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False, differentiable: bool = False,
                 fused: bool | None = None, grad_noise_std: float = 0.0) -> None:
        check_lr(lr)
        check_hyperparameter("lr_decay value", lr_decay, tensor_name="lr_decay")
        check_hyperparameter("weight_decay value", weight_decay, tensor_name="weight_decay")
        check_hyperparameter("initial_accumulator_value value", initial_accumulator_value,
                             tensor_name="initial_accumulator_value")
        check_hyperparameter("epsilon value", eps, tensor_name="eps")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused, grad_noise_std=grad_noise_std)
        super().__init__(params, defaults)
        for group in self.param_groups:  # eager state, so state_dict() matches torch.optim's before any step
            for p in group["params"]:
                self._state_for(p, group)

    def share_memory(self) -> None:
        """Move the accumulators into shared memory (torch.optim.Adagrad's, for Hogwild training)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

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
        if grads[0].is_sparse:
            sparse_adagrad_(params, grads, sums, minus_clr, group["eps"])
            return
        torch._foreach_addcmul_(sums, grads, grads, value=1)
        out = self._scratch(params, "denom")
        std = foreach_into(out, torch._foreach_sqrt, torch.sqrt, sums)
        std = in_place(torch._foreach_add_, torch._foreach_add, std, group["eps"])
        self._addcdiv_scaled_(params, grads, std, minus_clr)


def sparse_adagrad_(params: list[Tensor], grads: list[Tensor], sums: list[Tensor], minus_clr: list[float | Tensor],
                    eps: float) -> None:
    """Adagrad's update from sparse gradients, on the entries they hold (torch.optim's sparse rule)."""
    for p, g, state_sum, coef in zip(params, grads, sums, minus_clr):
        g = g.coalesce()  # the update is not linear in g: repeated indices must be summed first
        indices, values = g.indices(), g.values()
        state_sum.add_(torch.sparse_coo_tensor(indices, values.pow(2), g.shape))
        std_values = state_sum.sparse_mask(g).values().sqrt_().add_(eps)
        p.add_(torch.sparse_coo_tensor(indices, values / std_values, g.shape), alpha=scalar(coef))
