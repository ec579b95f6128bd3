"""optimlab's own optimizers: drop-in, numerically identical replacements for torch.optim's."""

from optimlab.optim.adagrad import Adagrad
from optimlab.optim.adam import Adam
from optimlab.optim.base import Optimizer
from optimlab.optim.rmsprop import RMSprop
from optimlab.optim.sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "RMSprop", "Optimizer"]
