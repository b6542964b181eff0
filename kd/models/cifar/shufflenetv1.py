"""ShuffleNetV1 for CIFAR (``shufflenet_v1``), the CRD zoo's ShuffleV1 student.

Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018 (arXiv:1707.01083), in the CIFAR form of the CRD code (Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699; HobbitLong/RepDistiller
``models/ShuffleNetv1.py``, also mdistiller's ``ShuffleNetv1.py``): a 1x1 stem to 24 channels at
full resolution, three stages of grouped bottlenecks (out widths 240/480/960, 4/8/4 blocks,
3 groups), each opened by a stride-2 block that concatenates an average-pooled shortcut, then
global average pooling and one linear layer. Layers, attribute names (so ``state_dict`` keys) and
parameter counts match the CRD code: 949,258 parameters at 100 classes. The pooling is adaptive
(the reference's ``avg_pool2d(4)`` is the same on 32x32 inputs) and the forward returns logits only.

Feature nodes (torch.fx names, 32x32 input): ``layer1`` (B, 240, 16, 16), ``layer2``
(B, 480, 8, 8), ``layer3`` (B, 960, 4, 4) the post-ReLU stage outputs (the last block's final
``relu``); their pre-ReLU counterparts ``layer1.3.add``, ``layer2.7.add``, ``layer3.3.add``;
``flatten`` the pooled 960-d embedding before ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kd.errors import ConfigError


class ChannelShuffle(nn.Module):
    """Interleaves the channels of ``groups`` groups: ``(B, g*n, H, W) -> (B, n*g, H, W)``.

    Same result as the reference's ``view(N, g, C//g, H, W).permute(0, 2, 1, 3, 4).reshape``,
    written without reading sizes so torch.fx traces it as three plain tensor methods.

    Args:
        groups: Number of channel groups; 1 leaves the input unchanged.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        x = x.unflatten(1, (self.groups, -1))  # (B, g, C/g, H, W)
        return x.transpose(1, 2).flatten(1, 2)  # (B, C, H, W), channels interleaved

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class Bottleneck(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1, with a residual connection.

    At stride 2 the shortcut is a 3x3 average pooling that is concatenated to the branch (so the
    block outputs ``c_out + c_in`` channels); at stride 1 it is the identity and is added.

    Args:
        c_in: Input channels.
        c_out: Channels of the residual branch.
        stride: 1 or 2.
        groups: Groups of the 1x1 convolutions.
        first_group_conv: Whether the first 1x1 convolution is grouped; the CRD code keeps it
            dense on the 24-channel stem output.
    """

    def __init__(
        self, c_in: int, c_out: int, stride: int, groups: int, first_group_conv: bool = True
    ) -> None:
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        g = groups if first_group_conv else 1
        self.conv1 = nn.Conv2d(c_in, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride == 2:
            self.shortcut = nn.AvgPool2d(3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, mid, H, W)
        out = self.shuffle1(out)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, mid, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, c_out, H/s, W/s)
        res = self.shortcut(x)  # (B, c_in, H/s, W/s)
        # The pre-activation is its own FX node (`cat` or `add`); the ReLU is not in place.
        if self.stride == 2:
            out = torch.cat([out, res], 1)  # (B, c_out + c_in, H/2, W/2)
        else:
            out = out + res
        return F.relu(out)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 for 32x32 inputs.

    Args:
        out_planes: Output widths of the three stages.
        num_blocks: Blocks per stage.
        groups: Groups of the 1x1 convolutions; must divide every width used.
        num_classes: Number of output classes.
        in_channels: Channels of the input images (only the stem convolution changes).

    Raises:
        ConfigError: On stage lists that are not three positive integers, widths that the groups
            do not divide, or non-positive ``num_classes`` / ``in_channels``.

    Example:
        >>> net = ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=100)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    stem_width = 24

    def __init__(
        self,
        out_planes: Sequence[int],
        num_blocks: Sequence[int],
        groups: int,
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        out_planes = [int(c) for c in out_planes]
        num_blocks = [int(n) for n in num_blocks]
        if len(out_planes) != 3 or len(num_blocks) != 3 or min(out_planes + num_blocks) < 1:
            raise ConfigError(
                "out_planes", f"needs three positive widths and block counts, got {out_planes}, {num_blocks}"
            )
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                "num_classes", f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}"
            )
        self.conv1 = nn.Conv2d(in_channels, self.stem_width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self._c = self.stem_width
        self.layer1 = self._make_stage(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_stage(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_stage(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.num_features = out_planes[2]

    def _make_stage(self, c_out: int, blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            # The stride-2 opener concatenates its input, so its branch is narrower by c_in.
            branch = c_out - self._c if i == 0 else c_out
            if branch < 4 or branch % 4 or (branch // 4) % groups or branch % groups:
                raise ConfigError(
                    "out_planes",
                    f"stage width {c_out} leaves a branch of {branch} channels after {self._c} "
                    f"input channels; it must be a positive multiple of 4 * groups ({4 * groups})",
                )
            first_group_conv = self._c != self.stem_width
            layers.append(Bottleneck(self._c, branch, 2 if i == 0 else 1, groups, first_group_conv))
            self._c = c_out
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(B, out_planes[2], H/8, W/8)``."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 24, H, W)
        x = self.layer1(x)  # (B, 240, H/2, W/2)
        x = self.layer2(x)  # (B, 480, H/4, W/4)
        return self.layer3(x)  # (B, 960, H/8, W/8)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last feature map."""
        x = self.flatten(self.avgpool(x))  # (B, out_planes[2])
        return self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


def shufflenet_v1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1 with widths 240/480/960, 4/8/4 blocks, 3 groups (949,258 parameters at 100 classes)."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes, in_channels)
