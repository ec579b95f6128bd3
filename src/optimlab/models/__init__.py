"""The classifiers: an MLP and a LeNet-style CNN."""

from optimlab.models.cnn import CNN
from optimlab.models.mlp import MLP

__all__ = ["MLP", "CNN"]
