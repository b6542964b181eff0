"""The fully connected nets of Hinton, Vinyals & Dean 2015 (MNIST): 784-1200-1200-10 teacher,
784-800-800-10 and 784-30-30-10 students.

Hinton et al., "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop,
arXiv:1503.02531, section 3. The teacher uses dropout on its hidden units (and, following
Hinton et al. 2012, on its inputs); the students are trained without regularisation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kd.errors import ConfigError


class MLP(nn.Module):
    """Flatten, then ``[Linear-ReLU-Dropout] x len(hidden)``, then a linear classifier.

    Args:
        num_classes: Number of output classes.
        in_features: Size of one flattened input (784 for MNIST; kd fills it from the data).
        hidden: Width of each hidden layer.
        dropout: Dropout after each hidden layer, in ``[0, 1)``.
        input_dropout: Dropout on the inputs, in ``[0, 1)``.

    Raises:
        ConfigError: On an empty ``hidden``, a non-positive width or a bad dropout.

    Example:
        >>> MLP(num_classes=10, in_features=784, hidden=(800, 800))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int = 784,
        hidden: Sequence[int] = (1200, 1200),
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if not hidden or min(hidden) < 1 or in_features < 1:
            raise ConfigError("hidden", f"needs one or more positive widths, got {hidden}")
        for name, p in (("dropout", dropout), ("input_dropout", input_dropout)):
            if not 0.0 <= p < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {p:g}")
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last hidden layer's activations, ``(B, hidden[-1])``."""
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` from the last hidden activations."""
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))  # (B, num_classes)
