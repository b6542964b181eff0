"""ResNet-50 for 32x32 inputs (``resnet50``), the CRD zoo's ResNet50 teacher.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385):
bottleneck blocks ``[3, 4, 6, 3]`` with widths 64/128/256/512 (x4 expansion), in the CIFAR form
of the CRD code (Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020,
arXiv:1910.10699; HobbitLong/RepDistiller ``models/resnetv2.py``, also mdistiller's
``resnetv2.py``): a 3x3 stride-1 stem with no max-pooling, so the stages run at 32, 16, 8 and 4
pixels. Layers, initialisation, attribute names (so ``state_dict`` keys) and parameter counts
match the CRD code: 23,705,252 parameters at 100 classes. The forward returns logits only.

Feature nodes (torch.fx names, 32x32 input): ``layer1`` (B, 256, 32, 32), ``layer2``
(B, 512, 16, 16), ``layer3`` (B, 1024, 8, 8), ``layer4`` (B, 2048, 4, 4) the post-ReLU stage
outputs (the last block's final ``relu``); their pre-ReLU residual sums ``layer1.2.add``,
``layer2.3.add``, ``layer3.5.add``, ``layer4.2.add``; ``flatten`` the pooled 2048-d embedding
before ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from kd.errors import ConfigError


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with a residual connection.

    Args:
        c_in: Input channels.
        planes: Width of the 3x3 convolution; the block outputs ``4 * planes`` channels.
        stride: Stride of the 3x3 convolution (and of the projection shortcut).
    """

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = self.expansion * planes
        self.conv1 = nn.Conv2d(c_in, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4 * planes, H/s, W/s)
        out = out + self.shortcut(x)  # the pre-activation: its own FX node (`add`)
        return F.relu(out)  # not in place, so the sum above stays readable


class ResNetV2(nn.Module):
    """A bottleneck ResNet for 32x32 inputs (3x3 stem, no max-pooling).

    Args:
        num_blocks: Bottleneck blocks in each of the four stages.
        num_classes: Number of output classes.
        in_channels: Channels of the input images (only the stem convolution changes).
        zero_init_residual: Start the last BatchNorm of every block at zero, so that each block
            begins as the identity (Goyal et al. 2017, arXiv:1706.02677); off in the CRD code.

    Raises:
        ConfigError: On block counts that are not four positive integers, or non-positive
            ``num_classes`` / ``in_channels``.

    Example:
        >>> net = ResNetV2((3, 4, 6, 3), num_classes=100)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 100,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        num_blocks = [int(n) for n in num_blocks]
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ConfigError("num_blocks", f"needs four positive block counts, got {num_blocks}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                "num_classes", f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}"
            )
        self._c = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(64, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(128, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(256, num_blocks[2], stride=2)
        self.layer4 = self._make_stage(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self.num_features = 512 * Bottleneck.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(Bottleneck(self._c, planes, stride if i == 0 else 1))
            self._c = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(B, 2048, H/8, W/8)``."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 64, H, W)
        x = self.layer1(x)  # (B, 256, H, W)
        x = self.layer2(x)  # (B, 512, H/2, W/2)
        x = self.layer3(x)  # (B, 1024, H/4, W/4)
        return self.layer4(x)  # (B, 2048, H/8, W/8)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last feature map."""
        x = self.flatten(self.avgpool(x))  # (B, 2048)
        return self.linear(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


def resnet50(num_classes: int = 100, in_channels: int = 3) -> ResNetV2:
    """ResNet-50 for 32x32 inputs, bottlenecks [3, 4, 6, 3] (23,705,252 parameters at 100 classes)."""
    return ResNetV2((3, 4, 6, 3), num_classes, in_channels)
