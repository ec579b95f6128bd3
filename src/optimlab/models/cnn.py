"""A LeNet-style convolutional classifier: two conv + max-pool blocks, then fully connected layers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from optimlab.models.activations import activation as make_activation
from optimlab.models.checks import check_common, check_positive_int, check_widths
from optimlab.models.init import initialise
from optimlab.models.mlp import dense_layers


def feature_size(image_size: int, blocks: int, kernel_size: int, pool_stride: int) -> int:
    """The side of the feature map after ``blocks`` conv blocks (a valid convolution, then 2x2 max-pooling
    at ``pool_stride``); below 1 where it shrinks to nothing."""
    size = image_size
    for _ in range(blocks):
        size = (size - kernel_size + 1 - 2) // pool_stride + 1
        if size < 1:
            return size
    return size


class CNN(nn.Module):
    """LeNet-style CNN, as in the JAX notebook: conv 5x5 (12) - pool - conv 5x5 (16) - pool -
    fc 120 - fc 84 - 10, 'valid' convolutions and 2x2 max-pooling.

    The notebook's stax ``MaxPool((2, 2))`` has stride 1 (stax's default), so the default here is
    ``pool_stride=1`` too (a 16x18x18 feature map into the first fully connected layer); classic
    LeNet subsampling is ``pool_stride=2``.

    Args:
        channels: output channels of each conv block. kernel_size: square kernel size.
        pool_stride: stride of the 2x2 max-pooling.
        fc: widths of the fully connected hidden layers. activation, init, init_std, dropout:
        as for :class:`~optimlab.models.MLP` (dropout before each fully connected layer).
    """

    def __init__(self, channels: Sequence[int] = (12, 16), kernel_size: int = 5, fc: Sequence[int] = (120, 84),
                 pool_stride: int = 1,
                 activation: str = "relu", init: str = "stax", init_std: float = 0.1, dropout: float = 0.0,
                 image_size: int = 28, in_channels: int = 1, num_classes: int = 10) -> None:
        check_widths("channels", channels, "[12,16]")
        check_widths("fc", fc, "[120,84]", empty=True)
        check_positive_int("kernel_size", kernel_size)
        check_positive_int("pool_stride", pool_stride)
        check_common(activation, init, init_std, dropout)
        super().__init__()
        layers: list[nn.Module] = []
        chans = in_channels
        size = feature_size(image_size, len(channels), kernel_size, pool_stride)
        if size < 1:  # the key to blame: the stride where the blocks would fit without it
            key, value = (("pool_stride", pool_stride) if feature_size(image_size, len(channels), kernel_size, 1) >= 1
                          else ("kernel_size", kernel_size))
            raise ValueError(f"model.{key}: {value} is too large for {len(channels)} conv blocks (model.channels) of "
                             f"kernel {kernel_size} and pooling stride {pool_stride} on a {image_size}px image: the "
                             f"feature map shrinks to nothing")
        for out in channels:
            layers += [nn.Conv2d(chans, out, kernel_size), make_activation(activation), nn.MaxPool2d(2, pool_stride)]
            chans = out
        layers.append(nn.Flatten())
        if dropout > 0:  # also on the conv features, before the first fully connected layer
            layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers, *dense_layers([chans * size * size, *fc], num_classes, activation, dropout))
        initialise(self, init, init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
