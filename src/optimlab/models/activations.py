"""Activation functions by name, as configs spell them."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"model.activation: {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
