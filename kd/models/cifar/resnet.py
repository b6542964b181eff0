"""The CIFAR ResNets of the CRD code lineage (resnet8 ... resnet110, resnet8x4, resnet32x4).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385),
section 4.2: a 3x3 stem, then three stages of ``n`` basic blocks at 32x32, 16x16 and 8x8, global
average pooling and a linear classifier; depth = 6n + 2. The ``x4`` variants (resnet8x4,
resnet32x4) widen the stem to 32 and the stages to 64/128/256, as in Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020 (arXiv:1910.10699).

Layers, widths and parameter counts match the CRD code (HobbitLong/RepDistiller
``models/resnet.py``, also mdistiller ``mdistiller/models/cifar/resnet.py``) exactly, and so do
the parameter names, so the reference teacher checkpoints load with ``load_state_dict``. Two
differences that change no number: the pooling is adaptive (the reference's ``AvgPool2d(8)`` is
the same on 32x32 inputs), and the forward returns logits only; intermediate features are read by
FX node name (see ``kd.models.features``):

- stage outputs (post-ReLU): ``layer1``, ``layer2``, ``layer3``;
- their pre-ReLU residual sums: ``layer{1,2,3}.{n-1}.add``;
- pooled embedding before ``fc``: ``flatten``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kd.errors import ConfigError


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 conv + BN when the shape changes).

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the first convolution (and of the shortcut).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))
        out = out + self.downsample(x)  # the pre-activation: its own FX node (`add`)
        return F.relu(out)  # not in place, so the sum above stays readable


class CifarResNet(nn.Module):
    """A CIFAR ResNet of depth ``6n + 2`` with basic blocks.

    Args:
        depth: Number of weighted layers, ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        widths: Stem width then the widths of the three stages, e.g. ``(16, 16, 32, 64)``.
        num_classes: Number of output classes.
        in_channels: Channels of the input images (only the stem convolution changes).

    Raises:
        ConfigError: On a depth that is not ``6n + 2`` with ``n >= 1``, or widths that are not
            four positive integers.

    Example:
        >>> net = CifarResNet(20, (16, 16, 32, 64), num_classes=100)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError("depth", f"must be 6n + 2 with n >= 1 (8, 20, 56, ...), got {depth}")
        widths = tuple(int(w) for w in widths)  # type: ignore[assignment]
        if len(widths) != 4 or min(widths) < 1:
            raise ConfigError("widths", f"needs four positive widths (stem, stages), got {widths}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                "num_classes",
                f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}",
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(c_in, c_out, stride)]
        layers += [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(B, widths[3], H/4, W/4)``."""
        x = self.relu(self.bn1(self.conv1(x)))  # (B, widths[0], H, W)
        x = self.layer1(x)  # (B, widths[1], H, W)
        x = self.layer2(x)  # (B, widths[2], H/2, W/2)
        return self.layer3(x)  # (B, widths[3], H/4, W/4)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last feature map."""
        x = self.flatten(self.avgpool(x))  # (B, widths[3])
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 (83,892 parameters at 100 classes)."""
    return CifarResNet(8, _THIN, num_classes, in_channels)


def resnet14(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-14 (181,108 parameters at 100 classes)."""
    return CifarResNet(14, _THIN, num_classes, in_channels)


def resnet20(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 (278,324 parameters at 100 classes)."""
    return CifarResNet(20, _THIN, num_classes, in_channels)


def resnet32(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (472,756 parameters at 100 classes)."""
    return CifarResNet(32, _THIN, num_classes, in_channels)


def resnet44(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 (667,188 parameters at 100 classes)."""
    return CifarResNet(44, _THIN, num_classes, in_channels)


def resnet56(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 (861,620 parameters at 100 classes)."""
    return CifarResNet(56, _THIN, num_classes, in_channels)


def resnet110(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 (1,736,564 parameters at 100 classes)."""
    return CifarResNet(110, _THIN, num_classes, in_channels)


def resnet8x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-8 with 4x widths 32/64/128/256 (1,233,540 parameters at 100 classes)."""
    return CifarResNet(8, _WIDE, num_classes, in_channels)


def resnet32x4(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 with 4x widths 32/64/128/256 (7,433,860 parameters at 100 classes)."""
    return CifarResNet(32, _WIDE, num_classes, in_channels)
