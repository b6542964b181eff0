"""A plain VGG-style CNN for small images (the digits teacher and student)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kd.errors import ConfigError


class ConvNet(nn.Module):
    """Stages of ``[conv3x3-BN-ReLU] x depth`` each followed by 2x2 max-pooling, then an MLP head.

    Args:
        num_classes: Number of output classes.
        in_channels: Channels of the input images.
        channels: Width of each stage; the spatial size halves after each one.
        depth: Convolutions per stage.
        hidden: Width of the hidden layer of the head; 0 for a single linear layer.
        dropout: Dropout before the last linear layer, in ``[0, 1)``.

    Raises:
        ConfigError: On an empty ``channels``, non-positive widths or depth, or a bad dropout.

    Example:
        >>> net = ConvNet(num_classes=10, in_channels=1, channels=(16, 32))
        >>> net(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64),
        depth: int = 1,
        hidden: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ConfigError("channels", f"needs one or more positive widths, got {channels}")
        if depth < 1 or hidden < 0:
            raise ConfigError("depth", f"depth must be >= 1 and hidden >= 0, got {depth}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {dropout:g}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            for _ in range(depth):
                layers += [
                    nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                ]
                c_in = c_out
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Flatten()]
        if hidden:
            head += [nn.Linear(c_in, hidden), nn.ReLU(inplace=True)]
            c_in = hidden
        head += [nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
        self.head = nn.Sequential(*head)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map, ``(B, channels[-1], H', W')``."""
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from a feature map."""
        return self.head(self.pool(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)
