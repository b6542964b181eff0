"""MobileNet-V1 for ImageNet, as the CRD/DKD lineage defines it (mdistiller's ``MobileNetV1``).

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", arXiv:1704.04861: a 3x3 stem of 32 channels, then 13 depthwise-separable blocks
(3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU) to 1024 channels, global average pooling
and a linear head. 4,231,976 parameters at 1000 classes. The module names are mdistiller's
(``model.<i>``, ``fc``), so its released ImageNet weights load as they are; the pooling is adaptive
(mdistiller's ``AvgPool2d(7)`` assumes 224 px: the same there, and any size here).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# (output channels, stride) of the 13 depthwise-separable blocks
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
           (1024, 2), (1024, 1)]


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """MobileNet-V1 (width 1): ``model`` (stem, 13 blocks, pooling) and ``fc``.

    Args:
        num_classes: Classes of the head.
        in_channels: Channels of the input images.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 2)]
        channels = 32
        for out, stride in _BLOCKS:
            layers.append(_conv_dw(channels, out, stride))
            channels = out
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, in_channels, H, W)``."""
        return self.fc(torch.flatten(self.model(x), 1))  # (B, 1024) pooled


def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV1:
    """MobileNet-V1: 4,231,976 parameters at 1000 classes."""
    return MobileNetV1(num_classes, in_channels)
