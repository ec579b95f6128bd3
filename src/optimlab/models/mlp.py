"""A fully connected classifier: 784 -> hidden widths -> 10."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from optimlab.models.activations import activation as make_activation
from optimlab.models.checks import check_common, check_widths
from optimlab.models.init import initialise


def dense_layers(widths: Sequence[int], num_classes: int, activation: str, dropout: float) -> list[nn.Module]:
    """Fully connected layers from ``widths[0]`` inputs through the hidden ``widths[1:]`` to ``num_classes``
    outputs: each hidden layer followed by its activation and, when ``dropout > 0``, dropout."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), make_activation(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-1], num_classes))
    return layers


class MLP(nn.Module):
    """Multilayer perceptron on flattened images.

    Args:
        hidden: widths of the hidden layers, e.g. ``[1024, 128]`` (at least one).
        activation: ``tanh`` | ``relu`` | ``sigmoid`` after each hidden layer.
        init: ``default`` (PyTorch's), ``normal`` (N(0, ``init_std``^2) weights and biases), ``glorot``
            or ``stax`` (see :func:`~optimlab.models.init.initialise`).
        dropout: dropout probability after each hidden activation (0 disables it).
    """

    def __init__(self, hidden: Sequence[int] = (1024, 128), activation: str = "tanh", init: str = "normal",
                 init_std: float = 0.1, dropout: float = 0.0, in_features: int = 784,
                 num_classes: int = 10) -> None:
        check_widths("hidden", hidden, "[1024,128]")
        check_common(activation, init, init_std, dropout)
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), *dense_layers([in_features, *hidden], num_classes, activation, dropout))
        initialise(self, init, init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
