"""A depthwise-separable CNN for small images: the student of ``docs/writing-a-model.md``.

Each block factorises a 3x3 convolution into a depthwise 3x3 (one filter per channel) and a
pointwise 1x1 that mixes channels, as MobileNets do (Howard et al., "MobileNets: Efficient
Convolutional Neural Networks for Mobile Vision Applications", arXiv:1704.04861, section 3.1):
``9*C_in + C_in*C_out`` weights instead of ``9*C_in*C_out``. ``tests/test_guides.py`` runs it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kd.errors import ConfigError


class SeparableBlock(nn.Module):
    """Depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU, then 2x2 max-pooling.

    Every step is a module of its own, so each has a name a method can read
    (``blocks.0.pw_act``) and FX sees no in-place operation.

    Args:
        in_channels: Channels in.
        out_channels: Channels out.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.dw_bn = nn.BatchNorm2d(in_channels)
        self.dw_act = nn.ReLU()
        self.pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(out_channels)
        self.pw_act = nn.ReLU()
        self.pool = nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw_act(self.dw_bn(self.dw(x)))  # (B, C_in, H, W)
        x = self.pw_act(self.pw_bn(self.pw(x)))  # (B, C_out, H, W)
        return self.pool(x)  # (B, C_out, ceil(H/2), ceil(W/2))


class SeparableCNN(nn.Module):
    """A 3x3 stem, then one ``SeparableBlock`` per width, global average pooling, a linear head.

    Parameters, for ``c_0 = stem`` and widths ``c_1 .. c_n`` (BatchNorm has 2 per channel):
    ``9*in_channels*c_0 + 2*c_0 + sum_i (11*c_{i-1} + c_{i-1}*c_i + 2*c_i) + (c_n + 1)*num_classes``
    (``parameter_count``); 1,418 for the digits config (1 channel, 8 -> 16 -> 32, 10 classes).

    Args:
        num_classes: Number of output classes (kd sets it from the data).
        in_channels: Channels of the input images (kd sets it from the data).
        stem: Width of the stem convolution.
        channels: Width of each separable block; the spatial size halves after each one.

    Raises:
        ConfigError: On an empty ``channels`` or a width below 1.

    Example:
        >>> SeparableCNN(num_classes=10, in_channels=1)(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, stem: int = 8, channels: Sequence[int] = (16, 32)
    ) -> None:
        super().__init__()
        widths = [int(stem), *(int(c) for c in channels)]
        if len(widths) < 2 or min(widths) < 1:
            raise ConfigError("channels", f"needs a stem and one or more block widths >= 1, got stem={stem}, channels={list(channels)}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        self.blocks = nn.Sequential(*(SeparableBlock(a, b) for a, b in zip(widths, widths[1:])))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(B, channels[-1], H', W')``."""
        return self.blocks(self.stem(x))

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from a feature map."""
        return self.fc(self.flatten(self.pool(x)))  # (B, C) -> (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


def parameter_count(num_classes: int, in_channels: int, stem: int, channels: Sequence[int]) -> int:
    """The number of parameters of ``SeparableCNN``, from the formula of its docstring."""
    widths = [stem, *channels]
    total = 9 * in_channels * stem + 2 * stem  # stem conv + BN
    for a, b in zip(widths, widths[1:]):
        total += 9 * a + 2 * a + a * b + 2 * b  # depthwise + BN, pointwise + BN
    return total + (widths[-1] + 1) * num_classes  # head
