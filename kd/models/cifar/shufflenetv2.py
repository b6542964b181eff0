"""ShuffleNetV2 (1x) for CIFAR (``shufflenet_v2``), the CRD zoo's ShuffleV2 student.

Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018 (arXiv:1807.11164), in the CIFAR form of the CRD code (Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699; HobbitLong/RepDistiller
``models/ShuffleNetv2.py`` with ``net_size=1``, also mdistiller's ``ShuffleNetv2.py``): a 1x1 stem
to 24 channels at full resolution, three stages (widths 116/232/464) each made of one stride-2
down-sampling block and 3/7/3 channel-split blocks, a 1x1 conv to 1024 channels, global average
pooling and one linear layer. Layers, attribute names (so ``state_dict`` keys) and parameter
counts match the CRD code: 1,355,528 parameters at 100 classes. The pooling is adaptive (the
reference's ``avg_pool2d(4)`` is the same on 32x32 inputs) and the forward returns logits only.

Feature nodes (torch.fx names, 32x32 input): ``layer1`` (B, 116, 16, 16), ``layer2``
(B, 232, 8, 8), ``layer3`` (B, 464, 4, 4) the post-ReLU stage outputs (the last block's
``relu``); their pre-ReLU counterparts ``layer1.3.shuffle.flatten``, ``layer2.7.shuffle.flatten``,
``layer3.3.shuffle.flatten`` (the shuffled concatenation, same channel order as the stage
outputs); ``relu_1`` (B, 1024, 4, 4) the last map after ``conv2``; ``flatten`` the pooled
1024-d embedding before ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kd.errors import ConfigError
from kd.models.cifar.shufflenetv1 import ChannelShuffle


class BasicBlock(nn.Module):
    """Channel split; one half passes through, the other through 1x1, depthwise 3x3, 1x1.

    The reference computes ``shuffle(cat([x1, relu(branch)]))``. Here the ReLU comes last,
    ``relu(shuffle(cat([x1, branch])))``: the same values (``x1`` is the output of earlier ReLUs,
    so never negative, and a ReLU commutes with a channel permutation) and the same gradients
    (a zero of ``x1`` already has zero gradient at the ReLU that made it), but the pre-activation
    becomes one FX node with the channel order of the block output.

    Args:
        channels: Input and output channels (even).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        c = self.split
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]  # (B, C/2, H, W) each
        out = self.relu(self.bn1(self.conv1(x2)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))  # (B, C/2, H, W)
        out = self.shuffle(torch.cat([x1, out], 1))  # (B, C, H, W), the pre-activation
        return F.relu(out)  # not in place, so the pre-activation stays readable


class DownBlock(nn.Module):
    """Stride-2 block: two branches on the full input, concatenated then shuffled.

    Left: depthwise 3x3 (stride 2), 1x1. Right: 1x1, depthwise 3x3 (stride 2), 1x1.

    Args:
        c_in: Input channels.
        c_out: Output channels (even); each branch gives half.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        # left
        self.conv1 = nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right
        self.conv3 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))  # (B, C_out/2, H/2, W/2)
        right = self.relu(self.bn3(self.conv3(x)))  # (B, C_out/2, H, W)
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))  # (B, C_out/2, H/2, W/2)
        return self.shuffle(torch.cat([left, right], 1))  # (B, C_out, H/2, W/2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 inputs.

    Args:
        out_channels: Widths of the three stages (even), then of the last 1x1 convolution.
        num_blocks: Channel-split blocks per stage (after its down-sampling block).
        num_classes: Number of output classes.
        in_channels: Channels of the input images (only the stem convolution changes).

    Raises:
        ConfigError: On widths that are not four positive integers with even stage widths, block
            counts that are not three positive integers, or non-positive ``num_classes`` /
            ``in_channels``.

    Example:
        >>> net = ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes=100)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    stem_width = 24

    def __init__(
        self,
        out_channels: Sequence[int],
        num_blocks: Sequence[int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        out_channels = [int(c) for c in out_channels]
        num_blocks = [int(n) for n in num_blocks]
        if len(out_channels) != 4 or min(out_channels) < 1 or any(c % 2 for c in out_channels[:3]):
            raise ConfigError(
                "out_channels", f"needs three even stage widths and a last width, got {out_channels}"
            )
        if len(num_blocks) != 3 or min(num_blocks) < 1:
            raise ConfigError("num_blocks", f"needs three positive block counts, got {num_blocks}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                "num_classes", f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}"
            )
        self.conv1 = nn.Conv2d(in_channels, self.stem_width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.stem_width)
        self.relu = nn.ReLU(inplace=True)
        widths = [self.stem_width] + out_channels[:3]
        self.layer1 = self._make_stage(widths[0], widths[1], num_blocks[0])
        self.layer2 = self._make_stage(widths[1], widths[2], num_blocks[1])
        self.layer3 = self._make_stage(widths[2], widths[3], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.num_features = out_channels[3]

    @staticmethod
    def _make_stage(c_in: int, c_out: int, blocks: int) -> nn.Sequential:
        return nn.Sequential(DownBlock(c_in, c_out), *(BasicBlock(c_out) for _ in range(blocks)))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(B, out_channels[3], H/8, W/8)``, after ``conv2``."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 24, H, W)
        x = self.layer1(x)  # (B, 116, H/2, W/2)
        x = self.layer2(x)  # (B, 232, H/4, W/4)
        x = self.layer3(x)  # (B, 464, H/8, W/8)
        return self.relu(self.bn2(self.conv2(x)))  # (B, 1024, H/8, W/8)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last feature map."""
        x = self.flatten(self.avgpool(x))  # (B, out_channels[3])
        return self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


def shufflenet_v2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    """ShuffleNetV2 1x: widths 116/232/464/1024, 3/7/3 blocks (1,355,528 parameters at 100 classes)."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes, in_channels)
