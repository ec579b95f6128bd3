"""optimlab: optimizers, training regimes and their diagnosis on MNIST."""

__version__ = "0.1.0"
