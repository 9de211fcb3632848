"""Small building blocks shared by the networks."""

from torch import nn


class ConvBNReLU(nn.Sequential):
    """conv -> BatchNorm -> ReLU, the unit every HA-CNN block is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
