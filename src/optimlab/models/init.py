"""Weight initialisation shared by the models."""

from __future__ import annotations

import torch
from torch import nn

INITS = ("default", "normal", "glorot")


def initialise(module: nn.Module, init: str, std: float) -> None:
    """``default``: PyTorch's own layer init. ``normal``: every weight and bias of every Linear and
    Conv layer drawn from N(0, std^2), as the JAX notebook's ``scale * randn`` does. ``glorot``:
    Glorot (Xavier) normal weights and zero biases, the default of the notebook's stax layers."""
    if init not in INITS:
        raise ValueError(f"model.init: {init!r} is not one of {INITS}")
    if init == "default":
        return
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            if init == "glorot":
                torch.nn.init.xavier_normal_(layer.weight)
                if layer.bias is not None:
                    torch.nn.init.zeros_(layer.bias)
            else:
                torch.nn.init.normal_(layer.weight, 0.0, std)
                if layer.bias is not None:
                    torch.nn.init.normal_(layer.bias, 0.0, std)
