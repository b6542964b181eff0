"""In-memory datasets of tensors and the stratified split the small datasets share."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset

from kd.data.order import Key, split_key
from kd.data.views import to_device
from kd.errors import ConfigError


class IndexedTensorDataset(Dataset):
    """Inputs and labels held as tensors; each item also carries its index in this dataset.

    The index is what instance-level methods (CRD's memory bank) key their state on.

    Args:
        inputs: ``(N, ...)``.
        targets: ``(N,)`` integer labels.
    """

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    num_views = 1  # no augmentation: each sample is one input

    def spec(self) -> dict[str, Any]:
        """How inputs are made from the stored tensors, for cache keys: as stored."""
        return {"normalize": None, "views": None}

    def to(self, device: torch.device | str) -> IndexedTensorDataset:
        """The same dataset with its tensors on ``device``."""
        return IndexedTensorDataset(self.inputs.to(device), self.targets.to(device))

    def draw_views(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n,)`` zeros: the one view."""
        return torch.zeros(n, dtype=torch.long)

    def render(self, index: Tensor, views: Tensor) -> Tensor:
        """The inputs ``(B, ...)`` of samples ``index`` (``views`` are all 0)."""
        return self.inputs[to_device(index, self.inputs.device)]

    def batch(self, index: Tensor, views: Tensor) -> dict[str, Tensor]:
        """A batch as every kd datamodule yields it."""
        index, views = to_device(index, self.inputs.device), to_device(views, self.inputs.device)
        return {"input": self.inputs[index], "target": self.targets[index], "index": index, "view": views}

    def __getitem__(self, key: Key) -> dict[str, Tensor | int]:
        i, _ = split_key(key)  # nothing random to draw from the sample's seed
        return {"input": self.inputs[i], "target": self.targets[i], "index": i, "view": 0}


def stratified_split(
    labels: np.ndarray, fractions: dict[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Splits sample indices into named parts with the class proportions of ``labels``.

    Args:
        labels: ``(N,)`` class labels.
        fractions: Fraction of the samples for each part but the first, which takes the rest
            (``{"train": 0, "val": 0.15, "test": 0.2}``).
        seed: Seed of the split, independent of the training seed, so every run of a sweep sees
            the same split.

    Returns:
        Sorted index arrays by part name.

    Raises:
        ConfigError: If a fraction is outside ``(0, 1)`` or they leave nothing for the first part.
    """
    names = list(fractions)
    rest_name, parts = names[0], names[1:]
    for name in parts:
        if not 0.0 < fractions[name] < 1.0:
            raise ConfigError(f"{name}_fraction", f"must be in (0, 1), got {fractions[name]:g}")
    if sum(fractions[n] for n in parts) >= 1.0:
        raise ConfigError(
            f"{parts[0]}_fraction", f"the fractions of {parts} leave no samples for {rest_name}"
        )
    remaining = np.arange(len(labels))
    left = 1.0
    out: dict[str, np.ndarray] = {}
    for name in parts:
        share = fractions[name] / left  # of what is still unassigned
        remaining, taken = train_test_split(
            remaining, test_size=share, stratify=labels[remaining], random_state=seed
        )
        out[name] = np.sort(taken)
        left -= fractions[name]
    out[rest_name] = np.sort(remaining)
    return {n: out[n] for n in names}


def to_long(a: np.ndarray) -> Tensor:
    """Labels as an int64 tensor."""
    return torch.as_tensor(np.asarray(a), dtype=torch.long)
