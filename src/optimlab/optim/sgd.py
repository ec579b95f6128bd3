"""Stochastic gradient descent with optional momentum, dampening, Nesterov and L2 decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim.base import (Optimizer, ParamsT, add_scaled_, check_hyperparameter, check_lr, foreach_into,
                                 mul_scaled_)


class SGD(Optimizer):
    r"""Stochastic gradient descent, numerically identical to ``torch.optim.SGD``.

    With gradient :math:`g_t` (negated if ``maximize``), learning rate :math:`\gamma`, momentum
    :math:`\mu`, dampening :math:`\tau` and weight decay :math:`\lambda`::

        g_t <- g_t + lambda * theta_{t-1}                      (if lambda != 0)
        b_t <- g_t                                             (first step, if mu != 0)
        b_t <- mu * b_{t-1} + (1 - tau) * g_t                  (later steps)
        g_t <- g_t + mu * b_t  (nesterov)   or   g_t <- b_t    (if mu != 0)
        theta_t <- theta_{t-1} - gamma * g_t

    State: ``momentum_buffer`` (only when momentum != 0). The TensorFlow notebook's hand-written
    SGD and ``tf.train.GradientDescentOptimizer`` are the ``momentum=0`` case. Note the momentum
    form: PyTorch (and this class) scales the *gradient* by the learning rate after accumulating,
    whereas Sutskever et al. and TF's MomentumOptimizer with a changing lr accumulate ``lr * g``;
    the two agree only while lr is constant.

    Args:
        params: parameters or parameter groups (a group may be member-wise, see
            :class:`~optimlab.optim.Optimizer`: then ``lr`` and ``weight_decay`` may hold one value per member).
        lr: learning rate (>= 0; a number or a 1-element tensor). momentum: >= 0.
        dampening: for momentum (>= 0). weight_decay: L2 (>= 0; a number or a 1-element tensor).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize: ascend instead of descend. foreach, differentiable, fused: torch.optim's
            implementation switches, accepted for compatibility (see base). grad_noise_std:
            Gaussian gradient noise (see base).

    Sparse gradients are supported, as in torch.optim (not with ``weight_decay``).
    """

    supports_sparse_grads = True
    fused_sparse_error = "`_fused_sgd` does not support sparse gradients"
    complex_as_real = False

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None,
                 grad_noise_std: float = 0.0) -> None:
        check_lr(lr)
        check_hyperparameter("momentum value", momentum)
        check_hyperparameter("dampening value", dampening, tensor_name="dampening")
        check_hyperparameter("weight_decay value", weight_decay, tensor_name="weight_decay")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening "
                             f"(momentum > 0 and dampening = 0; got {momentum} and {dampening})")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, grad_noise_std=grad_noise_std)
        super().__init__(params, defaults)

    def _state_for(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # Plain SGD keeps no state (torch.optim's state_dict is empty then); the momentum buffer
        # is created from the first gradient in _update.
        return self.state[p] if group["momentum"] != 0 else {}

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]]) -> None:
        momentum = group["momentum"]
        if momentum != 0:
            fresh = [s.get("momentum_buffer") is None for s in states]
            old = [(s["momentum_buffer"], g) for s, g, f in zip(states, grads, fresh) if not f]
            if old:
                old_bufs, old_grads = (list(t) for t in zip(*old))
                mul_scaled_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_grads, alpha=1 - group["dampening"])
            for s, g, f in zip(states, grads, fresh):
                if f:  # the first buffer is the gradient itself (no dampening), as in torch.optim; a copy that
                    s["momentum_buffer"] = torch.clone(g)  # autograd records under differentiable=True only
            bufs = [s["momentum_buffer"] for s in states]
            if group["nesterov"]:  # into the "grad" scratch, which the prepared gradients may be already
                grads = foreach_into(self._scratch(grads, "grad"), torch._foreach_add, torch.add, grads, bufs,
                                     alpha=momentum)
            else:
                grads = bufs
        add_scaled_(params, grads, -group["lr"])
