"""VGG with batch normalisation for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19).

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015 (arXiv:1409.1556), in the CIFAR form of the CRD code (Tian, Krishnan, Isola,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699; HobbitLong/RepDistiller
``models/vgg.py``, also mdistiller's ``vgg.py``): five blocks of ``conv3x3(bias)-BN-ReLU``, 2x2
max-pooling after the first three only, global average pooling and a single linear layer on 512
features. Layers, attribute names (so ``state_dict`` keys) and parameter counts match the CRD code
(vgg8 3,965,028 parameters at 100 classes, vgg13 9,462,180). The CRD code also pools after the
fourth block for 64-pixel inputs (``if h == 64``); that branch on the input size is left out so
the forward pass traces with torch.fx: inputs are CIFAR-sized (32x32).

Feature nodes (torch.fx names, 32x32 input): ``relu0`` (B, 64, 32, 32), ``relu1``
(B, 128, 16, 16), ``relu2`` (B, 256, 8, 8), ``relu3`` (B, 512, 4, 4), ``relu4`` (B, 512, 4, 4) after
each block's ReLU; ``block1`` ... ``block4`` are the same before it (their last BatchNorm);
``flatten`` is the pooled 512-d embedding before ``classifier``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd.errors import ConfigError

# Widths of the convolutions of each of the five blocks, per depth (the CRD code's cfg S/A/B/D/E).
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(widths: tuple[int, ...], in_channels: int) -> nn.Sequential:
    """``[conv3x3-BN-ReLU] x len(widths)`` without the last ReLU, so the block ends in BN (pre-ReLU)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for 32x32 images, as in the CRD code.

    Args:
        depth: 8, 11, 13, 16 or 19 (the number of convolutions plus the linear layer, counted
            as in the CRD code).
        num_classes: Number of output classes.
        in_channels: Channels of the input images (only the first convolution changes).

    Raises:
        ConfigError: On an unknown depth or non-positive ``num_classes`` / ``in_channels``.

    Example:
        >>> net = VGG(depth=8, num_classes=100)
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, depth: int = 8, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ConfigError("depth", f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError(
                "num_classes", f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}"
            )
        cfg = CONFIGS[depth]
        self.block0 = _block(cfg[0], in_channels)
        self.block1 = _block(cfg[1], cfg[0][-1])
        self.block2 = _block(cfg[2], cfg[1][-1])
        self.block3 = _block(cfg[3], cfg[2][-1])
        self.block4 = _block(cfg[4], cfg[3][-1])
        # Separate, not in place: each block's BN output (pre-ReLU) stays a feature of its own.
        self.relu0, self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(5))
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
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
        """The last feature map, ``(B, 512, H/8, W/8)`` after its ReLU."""
        x = self.pool0(self.relu0(self.block0(x)))  # (B, 64, H/2, W/2)
        x = self.pool1(self.relu1(self.block1(x)))  # (B, 128, H/4, W/4)
        x = self.pool2(self.relu2(self.block2(x)))  # (B, 256, H/8, W/8)
        x = self.relu3(self.block3(x))  # (B, 512, H/8, W/8)
        return self.relu4(self.block4(x))  # (B, 512, H/8, W/8)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last feature map."""
        x = torch.flatten(self.pool4(x), 1)  # (B, 512)
        return self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)


def vgg8(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-8 with BN (CRD's ``vgg8_bn``, config S): 3,965,028 parameters at 100 classes."""
    return VGG(8, num_classes, in_channels)


def vgg11(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-11 with BN (CRD's ``vgg11_bn``, config A): 9,277,284 parameters at 100 classes."""
    return VGG(11, num_classes, in_channels)


def vgg13(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-13 with BN (CRD's ``vgg13_bn``, config B): 9,462,180 parameters at 100 classes."""
    return VGG(13, num_classes, in_channels)


def vgg16(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-16 with BN (CRD's ``vgg16_bn``, config D): 14,774,436 parameters at 100 classes."""
    return VGG(16, num_classes, in_channels)


def vgg19(num_classes: int = 100, in_channels: int = 3) -> VGG:
    """VGG-19 with BN (CRD's ``vgg19_bn``, config E): 20,086,692 parameters at 100 classes."""
    return VGG(19, num_classes, in_channels)
