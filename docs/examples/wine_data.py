"""scikit-learn's wine data as a kd datamodule: tabular inputs ``(13,)`` for an MLP.

178 wines from one region of Italy, 13 chemical measurements each (alcohol, malic acid, ...,
proline), three cultivars: the UCI "Wine" data (Forina et al.; Aeberhard, Coomans & de Vel,
"Comparative analysis of statistical pattern recognition methods in high dimensional settings",
Pattern Recognition 27(8), 1994). It ships inside scikit-learn (``sklearn.datasets.load_wine``):
nothing to download. The features span four orders of magnitude (hue ~1, proline ~750), so each
is standardised, with the mean and std of the training split only.

The worked example of ``docs/writing-a-datamodule.md``; ``tests/test_guides_extend.py`` runs it.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_wine

from kd.data.splits import SplitDataModule
from kd.data.tensor import IndexedTensorDataset, stratified_split, to_long
from kd.errors import check_int


class WineDataModule(SplitDataModule):
    """The wine data, split train/val/test with a fixed seed, stratified by cultivar.

    Each feature is standardised with the mean and std of the training split (``mean``,
    ``std``, set by ``setup``), so nothing about val or test leaks into training. Model
    selection uses ``val``; ``test`` is only evaluated at the end.

    Args:
        batch_size: Training batch size.
        eval_batch_size: Batch size for val and test (defaults to 4x ``batch_size``).
        val_fraction: Share of all samples held out for validation.
        test_fraction: Share of all samples held out for the final test.
        split_seed: Seed of the split (not of training).
        num_workers: DataLoader workers; 0 is fastest for data this small.

    Raises:
        ConfigError: On a non-positive batch size or fractions that do not leave a training set.

    Example:
        >>> dm = WineDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> {k: len(v) for k, v in dm.splits.items()}
        {'train': 115, 'val': 27, 'test': 36}
    """

    # known before setup(): kd builds the models from them before any data is loaded
    num_classes = 3
    input_shape = (13,)

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("split_seed", split_seed, 0)):
            check_int(name, value, low, valid=f">= {low}")
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, 1, valid=">= 1 or null")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 4 * batch_size
        self.num_workers = num_workers
        self.fractions = {"train": 0.0, "val": val_fraction, "test": test_fraction}
        self.split_seed = split_seed
        stratified_split(np.arange(20) % 2, self.fractions, 0)  # bad fractions fail now, not in setup
        self.splits: dict[str, IndexedTensorDataset] = {}
        self.split_indices: dict[str, np.ndarray] = {}  # indices into load_wine(), per split
        self.mean: torch.Tensor | None = None  # (13,), of the training split
        self.std: torch.Tensor | None = None  # (13,)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:  # Lightning calls it once per stage; the split never changes
            return
        wine = load_wine()
        features = torch.as_tensor(wine.data, dtype=torch.float32)  # (178, 13)
        labels = np.asarray(wine.target)  # (178,) in {0, 1, 2}
        self.split_indices = stratified_split(labels, self.fractions, self.split_seed)
        train = features[self.split_indices["train"]]  # (N_train, 13)
        self.mean, self.std = train.mean(dim=0), train.std(dim=0)  # (13,) each
        for name, idx in self.split_indices.items():
            inputs = (features[idx] - self.mean) / self.std  # (N_split, 13)
            self.splits[name] = IndexedTensorDataset(inputs, to_long(labels[idx]))
