"""The wide ResNets of the CRD code lineage (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Zagoruyko, Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146): a 3x3 stem of 16
channels, then three stages of ``n`` pre-activation blocks (BN-ReLU-conv twice) of widths
16k/32k/64k at 32x32, 16x16 and 8x8, a final BN-ReLU, global average pooling and a linear
classifier; depth = 6n + 4, ``k`` the widening factor. ``wrn_<depth>_<k>`` names them.

Layers, widths and parameter counts match the CRD code (HobbitLong/RepDistiller ``models/wrn.py``,
also mdistiller ``mdistiller/models/cifar/wrn.py``) exactly, with dropout 0, and so do the parameter
names, so the reference teacher checkpoints load with ``load_state_dict``. The pooling is adaptive
(the reference's ``avg_pool2d(8)`` is the same on 32x32 inputs) and the forward returns logits only;
features are read by FX node name (see ``kd.models.features``). The blocks are pre-activation, so a stage's
output is a raw residual sum and its BN-ReLU lives in the next stage's first block:

- stage outputs (raw sums, what the reference returns as features): ``block1``, ``block2``,
  ``block3``;
- their BN (the reference's ``preact`` features): ``block2.layer.0.bn1``, ``block3.layer.0.bn1``,
  ``bn1``; after ReLU: ``block2.layer.0.relu1``, ``block3.layer.0.relu1``, ``relu``;
- pooled embedding before ``fc``: ``flatten``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd.errors import ConfigError


class BasicBlock(nn.Module):
    """A pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    When the shape changes, the shortcut is a strided 1x1 convolution of the *activated* input,
    as in the reference; otherwise it is the raw input.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the first convolution (and of the shortcut).
        dropout: Dropout between the two convolutions, in ``[0, 1)``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()  # not in place: the BN before it is a feature tap
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = c_in == c_out and stride == 1
        self.convShortcut: nn.Module | None = None  # reference name, for checkpoint loading
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))  # (B, C_in, H, W)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))  # (B, C_out, H/s, W/s)
        out = self.conv2(self.dropout(out))
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``n`` blocks, the first one changing width and resolution.

    Args:
        n: Number of blocks.
        c_in: Input channels.
        c_out: Output channels.
        stride: Stride of the first block.
        dropout: Dropout inside each block.
    """

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, dropout)
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """A wide ResNet of depth ``6n + 4`` and widening factor ``widen_factor``.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: Widening factor ``k``; the stages are 16k, 32k and 64k wide.
        num_classes: Number of output classes.
        in_channels: Channels of the input images (only the stem convolution changes).
        dropout: Dropout inside each block, in ``[0, 1)`` (0 in the CRD recipes).

    Raises:
        ConfigError: On a depth that is not ``6n + 4`` with ``n >= 1``, a non-positive widening
            factor, or a bad dropout.

    Example:
        >>> net = WideResNet(16, 2, num_classes=100)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ConfigError("depth", f"must be 6n + 4 with n >= 1 (10, 16, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ConfigError("widen_factor", f"must be >= 1, got {widen_factor}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {dropout:g}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                "num_classes",
                f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}",
            )
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, dropout)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, dropout)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # not in place: ``bn1`` is the last stage's pre-activation tap
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init over fan-out, as in the reference
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map after the final BN-ReLU, ``(B, 64k, H/4, W/4)``."""
        x = self.conv1(x)  # (B, 16, H, W)
        x = self.block1(x)  # (B, 16k, H, W)
        x = self.block2(x)  # (B, 32k, H/2, W/2)
        x = self.block3(x)  # (B, 64k, H/4, W/4)
        return self.relu(self.bn1(x))

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last feature map."""
        x = self.flatten(self.avgpool(x))  # (B, 64k)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


def wrn_16_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-16-1 (180,916 parameters at 100 classes)."""
    return WideResNet(16, 1, num_classes, in_channels)


def wrn_16_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-16-2 (703,284 parameters at 100 classes)."""
    return WideResNet(16, 2, num_classes, in_channels)


def wrn_40_1(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-40-1 (569,780 parameters at 100 classes)."""
    return WideResNet(40, 1, num_classes, in_channels)


def wrn_40_2(num_classes: int = 100, in_channels: int = 3) -> WideResNet:
    """WRN-40-2 (2,255,156 parameters at 100 classes)."""
    return WideResNet(40, 2, num_classes, in_channels)
