"""Activation functions by name, as configs spell them."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    """A new ``name`` activation (one of :data:`ACTIVATIONS`: the models check it first, ``check_common``)."""
    return ACTIVATIONS[name]()
