"""Adam and AdamW: bias-corrected first and second moment estimates."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optimlab.optim.base import Optimizer, ParamsT, check_range, foreach_into, zeros_state, zeros_step


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

    State: ``step`` (float32 CPU tensor), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).

    Difference from the TF1 / Kingma–Ba "efficient" form used in the TensorFlow notebook
    (``lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``; ``theta -= lr_t * m / (sqrt(v) + eps_hat)``):
    there epsilon ("epsilon hat") is added to the *uncorrected* ``sqrt(v)``, here to the
    bias-corrected one. The two agree when ``eps = eps_hat / sqrt(1 - beta2^t)``, so TF's
    epsilon weighs up to ``1/sqrt(1 - beta2)`` (about 32x for beta2=0.999) more in early steps.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False,
                 grad_noise_std: float = 0.0) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
        check_range("beta1 (betas[0])", betas[0], 0.0, 1.0, high_open=True)
        check_range("beta2 (betas[1])", betas[1], 0.0, 1.0, high_open=True)
        check_range("eps", eps, 0.0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                        grad_noise_std=grad_noise_std)
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
        if group["weight_decay"] != 0 and group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        minus_step_size = [-(lr / (1 - beta1**t)) for t in steps]
        bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
        second = exp_avg_sqs
        if group["amsgrad"]:
            # A state_dict from a run without amsgrad has no max_exp_avg_sq yet: start it at zero.
            second = zeros_state(states, "max_exp_avg_sq", params)
            torch._foreach_maximum_(second, exp_avg_sqs)
        denom = foreach_into(self._scratch(params, "denom"), torch._foreach_sqrt, torch.sqrt, second)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denom, minus_step_size)
