"""Weight initialisation shared by the models."""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("default", "normal", "glorot", "stax")

# jax.nn.initializers.glorot_normal draws from a normal truncated at two standard deviations,
# divided by that distribution's std so the weights keep the Glorot variance.
_TRUNCATED_STD = 0.87962566103423978


def glorot_std(weight: torch.Tensor) -> float:
    """sqrt(2 / (fan_in + fan_out)), fans counted over the kernel's receptive field for convolutions."""
    receptive = weight[0][0].numel()
    return math.sqrt(2.0 / ((weight.shape[0] + weight.shape[1]) * receptive))


def initialise(module: nn.Module, init: str, std: float) -> None:
    """``default``: PyTorch's own layer init. ``normal``: every weight and bias of every Linear and
    Conv layer drawn from N(0, std^2), as the JAX notebook's ``scale * randn`` does. ``glorot``:
    Glorot (Xavier) normal weights and zero biases. ``stax``: the defaults of the notebook's stax
    layers: Glorot-variance weights from a normal truncated at 2 std (``jax.nn.initializers.glorot_normal``),
    biases N(0, 1e-2^2) for Dense and N(0, 1e-6^2) for Conv layers. (``init`` is one of :data:`INITS`: the
    models check it first, ``check_common``.)"""
    if init == "default":
        return
    for layer in module.modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if init == "normal":
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.normal_(layer.bias, 0.0, std)
        elif init == "glorot":
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        else:
            scale = glorot_std(layer.weight) / _TRUNCATED_STD
            nn.init.trunc_normal_(layer.weight, 0.0, scale, -2 * scale, 2 * scale)
            if layer.bias is not None:
                # stax's bias initialisers: Dense ``normal()`` (std 1e-2), Conv ``normal(1e-6)``.
                nn.init.normal_(layer.bias, 0.0, 1e-2 if isinstance(layer, nn.Linear) else 1e-6)
