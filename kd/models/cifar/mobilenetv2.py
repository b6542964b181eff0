"""MobileNetV2 for CIFAR, and ``mobile_half`` (width 0.5), the CRD zoo's MobileNetV2 student.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018 (arXiv:1801.04381), in the CIFAR form of the CRD code (Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699; HobbitLong/RepDistiller
``models/mobilenetv2.py``, from "Knowledge Distillation via Route Constrained Optimization",
also mdistiller's ``mobilenetv2.py``): a stride-2 stem, seven stages of inverted residuals (the
second one at stride 1 for 32x32 inputs), a 1x1 conv to 1280 channels, average pooling and one
linear layer. Layers, attribute names (so ``state_dict`` keys) and parameter counts match the CRD
code: ``mobile_half`` has 812,836 parameters at 100 classes. The CRD code pools with
``AvgPool2d(2, ceil_mode=True)`` over the 2x2 map of a 32x32 input; the global average pooling
here computes the same and also accepts other input sizes.

The stages end in linear bottlenecks (no ReLU), so each stage's output is also its
"pre-activation". Feature nodes (torch.fx names, 32x32 input, width 0.5): ``conv1``
(B, 16, 16, 16) the stem; ``blocks.1`` (B, 12, 16, 16), ``blocks.2`` (B, 16, 8, 8), ``blocks.4``
(B, 48, 4, 4), ``blocks.6`` (B, 160, 2, 2) the CRD code's four stage features (module names: the
last node inside, ``blocks.1.1.add`` for ``blocks.1``); ``conv2`` (B, 1280, 2, 2) the last map;
``flatten`` the pooled 1280-d embedding before ``classifier``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd.errors import ConfigError


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, 1x1 linear projection; identity shortcut when shapes allow.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the depthwise convolution, 1 or 2.
        expand_ratio: Width of the hidden layer as a multiple of ``c_in``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:  # fixed at construction, so FX traces one branch
            return x + self.conv(x)  # (B, C, H, W)
        return self.conv(x)  # (B, C_out, H / stride, W / stride)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 images, as in the CRD code.

    Args:
        num_classes: Number of output classes.
        in_channels: Channels of the input images (only the stem convolution changes).
        expand_ratio: Expansion ``t`` of the inverted residuals after the first stage (6 in the
            paper).
        width_mult: Multiplier of every stage width (0.5 for ``mobile_half``); the last conv
            keeps 1280 channels unless ``width_mult > 1``.

    Raises:
        ConfigError: On a non-positive argument or a width multiplier that leaves a stage empty.

    Example:
        >>> net = MobileNetV2(num_classes=100, width_mult=0.5)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self, num_classes: int = 100, in_channels: int = 3, expand_ratio: int = 6, width_mult: float = 1.0
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or expand_ratio < 1:
            raise ConfigError(
                "num_classes",
                f"num_classes, in_channels and expand_ratio must be >= 1, got {num_classes}, {in_channels}, "
                f"{expand_ratio}",
            )
        if int(16 * width_mult) < 1:
            raise ConfigError(
                "width_mult", f"must keep every stage at least 1 channel wide (>= 1/16), got {width_mult:g}"
            )
        t = expand_ratio
        # (expansion, width, blocks, stride of the first block); CIFAR: the second stage keeps stride 1.
        setting = [
            (1, 16, 1, 1), (t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2), (t, 320, 1, 1),
        ]
        c_in = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        for expansion, width, n, stride in setting:
            c_out = int(width * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # The CRD code's initialisation: He-normal (fan-out) convolutions, N(0, 0.01) classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(B, last_channel, H/16, W/16)``."""
        x = self.conv1(x)  # (B, 32w, H/2, W/2)
        for stage in self.blocks:
            x = stage(x)  # (B, 320w, H/16, W/16) after the last
        return self.conv2(x)  # (B, last_channel, H/16, W/16)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last feature map."""
        x = torch.flatten(self.avgpool(x), 1)  # (B, last_channel)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


def mobile_half(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """MobileNetV2 at width 0.5, expansion 6 (CRD's ``mobile_half``): 812,836 parameters at 100 classes."""
    return MobileNetV2(num_classes, in_channels, expand_ratio=6, width_mult=0.5)
