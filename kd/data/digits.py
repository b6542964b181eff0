"""The digits data that ships inside scikit-learn: kd's default, with nothing to download.

1,797 real handwritten digits as 8x8 grey images with 17 grey levels (the UCI "Optical
Recognition of Handwritten Digits" test set), 10 classes. Loaded with
``sklearn.datasets.load_digits``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from kd.data.splits import SplitDataModule
from kd.data.tensor import IndexedTensorDataset, stratified_split, to_long
from kd.errors import check_int


class DigitsDataModule(SplitDataModule):
    """scikit-learn's digits, split train/val/test with a fixed seed, stratified by class.

    Pixels are scaled to ``[0, 1]`` and standardised with the mean and std of the training split.
    Model selection uses ``val``; ``test`` is only evaluated at the end.

    Args:
        batch_size: Training batch size.
        eval_batch_size: Batch size for val and test (defaults to 4x ``batch_size``).
        val_fraction: Share of all samples held out for validation.
        test_fraction: Share of all samples held out for the final test.
        split_seed: Seed of the split (not of training).
        num_workers: DataLoader workers; 0 is fastest for data this small.
        fast: Serve whole batches sliced from the in-memory tensors (``kd.data.fast``), on the
            GPU when training on one, instead of a DataLoader making each sample alone.

    Raises:
        ConfigError: On a non-positive batch size or fractions that do not leave a training set.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        fast: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("split_seed", split_seed, 0)):
            check_int(name, value, low, valid=f">= {low}")
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, 1, valid=">= 1 or null")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 4 * batch_size
        self.num_workers = num_workers
        self.fast = bool(fast)
        self.fractions = {"train": 0.0, "val": val_fraction, "test": test_fraction}
        self.split_seed = split_seed
        stratified_split(np.arange(20) % 2, self.fractions, 0)  # checks the fractions now
        self.splits: dict[str, IndexedTensorDataset] = {}
        self.split_indices: dict[str, np.ndarray] = {}  # indices into load_digits(), per split

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8)
        labels = np.asarray(digits.target)
        parts = stratified_split(labels, self.fractions, self.split_seed)
        self.split_indices = parts
        train = images[parts["train"]]
        mean, std = train.mean(), train.std()
        for name, idx in parts.items():
            self.splits[name] = IndexedTensorDataset((images[idx] - mean) / std, to_long(labels[idx]))
