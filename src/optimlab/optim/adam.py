"""Adam and AdamW: bias-corrected first and second moment estimates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim.base import (Optimizer, ParamsT, add_scaled_, applied_as_tensor, as_hyperparameter,
                                 check_hyperparameter, check_lr, coefficient, foreach_into, in_place, mul_scaled_,
                                 nonzero, recorded_copies, scalar, zeros_state, zeros_step)


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015), numerically identical to ``torch.optim.Adam``; with
    ``decoupled_weight_decay=True`` it is AdamW (Loshchilov & Hutter, 2019).

    With gradient :math:`g_t` (negated if ``maximize``; plus ``weight_decay * theta`` unless the
    decay is decoupled)::

        t       <- t + 1
        theta   <- theta * (1 - lr * weight_decay)          (decoupled only)
        m_t     <- beta1 * m_{t-1} + (1 - beta1) * g_t
        v_t     <- beta2 * v_{t-1} + (1 - beta2) * g_t^2
        vmax_t  <- max(vmax_{t-1}, v_t)                     (amsgrad; used instead of v_t below)
        theta_t <- theta_{t-1} - lr / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)

    State: ``step`` (a CPU scalar tensor), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).

    Difference from the TF1 / Kingma–Ba "efficient" form used in the TensorFlow notebook
    (``lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``; ``theta -= lr_t * m / (sqrt(v) + eps_hat)``):
    there epsilon ("epsilon hat") is added to the *uncorrected* ``sqrt(v)``, here to the
    bias-corrected one. The two agree when ``eps = eps_hat / sqrt(1 - beta2^t)``, so TF's
    epsilon weighs up to ``1/sqrt(1 - beta2)`` (about 32x for beta2=0.999) more in early steps.

    Args:
        params: parameters or parameter groups (a group may be member-wise, see
            :class:`~optimlab.optim.Optimizer`: then ``lr`` and ``weight_decay`` may hold one value per member).
        lr: learning rate (>= 0; a number or a 1-element tensor). betas: (beta1, beta2), each in
            [0, 1); both numbers or both 1-element tensors. eps: >= 0. weight_decay: >= 0 (a number
            or a 1-element tensor). amsgrad: use the running maximum of the second moment.
        foreach, capturable, differentiable, fused: torch.optim's implementation switches, accepted
            for compatibility (see base); as torch.optim, a tensor ``lr`` or ``betas`` is refused with
            ``foreach=True``. maximize: ascend instead of descend. decoupled_weight_decay: AdamW.
        grad_noise_std: Gaussian gradient noise (see base).
    """

    sparse_advice = ", please consider SparseAdam instead"

    def __init__(self, params: ParamsT, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float | Tensor = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False, grad_noise_std: float = 0.0) -> None:
        if isinstance(lr, Tensor) and foreach and not capturable:  # torch.optim's refusal (drop-in)
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        check_lr(lr)
        check_hyperparameter("epsilon value", eps, tensor_name="eps")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
        for i, beta in enumerate(betas):
            check_hyperparameter(f"beta parameter at index {i}", beta, 0.0, 1.0, high_open=True,
                                 tensor_name=f"betas[{i}]")
        check_hyperparameter("weight_decay value", weight_decay, tensor_name="weight_decay")
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError("betas must be either both floats or both Tensors (got "
                             f"{type(betas[0]).__name__} and {type(betas[1]).__name__})")
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) and foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
        defaults = dict(lr=lr, betas=(as_hyperparameter(betas[0]), as_hyperparameter(betas[1])), eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, grad_noise_std=grad_noise_std)
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["step"] = zeros_step()
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]]) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        steps = self._advance_steps(states)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        if group["decoupled_weight_decay"] and nonzero(group["weight_decay"]):
            mul_scaled_(params, 1 - lr * group["weight_decay"])
        # torch.optim casts a tensor beta1 to the parameters' dtype before forming 1 - beta1.
        beta1_like_params = beta1.to(params[0].dtype) if isinstance(beta1, Tensor) else beta1
        weight1 = coefficient(1 - beta1_like_params)
        torch._foreach_lerp_(exp_avgs, grads, [weight1] * len(grads) if applied_as_tensor(weight1) else weight1)
        mul_scaled_(exp_avg_sqs, beta2)
        if applied_as_tensor(beta2):  # a betas tensor autograd records
            add_scaled_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
        else:
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, scalar(1 - beta2))
        minus_step_size = [-(lr / (1 - beta1**t)) for t in steps]
        bias_correction2_sqrt = [coefficient((1 - beta2**t) ** 0.5) for t in steps]
        second = exp_avg_sqs
        if group["amsgrad"]:
            # A state_dict from a run without amsgrad has no max_exp_avg_sq yet: start it at zero.
            second = zeros_state(states, "max_exp_avg_sq", params)
            torch._foreach_maximum_(second, recorded_copies(exp_avg_sqs))
        out = self._scratch(params, "denom")
        denom = foreach_into(out, torch._foreach_sqrt, torch.sqrt, second)
        denom = in_place(torch._foreach_div_, torch._foreach_div, denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        self._addcdiv_scaled_(params, exp_avgs, denom, minus_step_size)
