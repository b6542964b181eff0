"""CIFAR-10 and CIFAR-100 through torchvision, held in memory as uint8, with the standard
augmentation (4-px pad + random 32 crop + horizontal flip, drawn as one of 162 views, ``kd.data.views``)
on training images.

50,000 training and 10,000 test images of 32x32. A validation split of ``val_size`` images is
carved from the training set (stratified, fixed ``split_seed``), so model selection never sees
the test set. Read with ``torchvision.datasets.CIFAR10/100`` from ``<root>/cifar-10-batches-py``
or ``<root>/cifar-100-python`` (the python pickles); ``download=true`` fetches them.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from kd.data.splits import SplitDataModule
from kd.data.views import ImageViews, PadCrop
from kd.errors import ConfigError, check_int

# per-channel mean and std of the training images in [0, 1] (CIFAR-100: the CRD code's values)
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


def _present_only(cls: type[CIFAR10]) -> type[CIFAR10]:
    """torchvision's dataset class, checking that the files exist instead of their md5.

    The md5 of the published archive is still checked when torchvision downloads it; the check
    of every file at every start only costs time, and refuses files written by kd's tests.
    """
    return type(cls.__name__, (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


_DATASETS = {"cifar10": _present_only(CIFAR10), "cifar100": _present_only(CIFAR100)}


class CIFARDataModule(SplitDataModule):
    """CIFAR-10 or CIFAR-100: train / val (carved from train) / test, in memory.

    Args:
        root: Directory holding ``cifar-10-batches-py`` or ``cifar-100-python``.
        dataset: ``cifar10`` or ``cifar100``.
        batch_size: Training batch size (the CRD/DKD recipe: 64).
        eval_batch_size: Batch size for val and test (defaults to 4x ``batch_size``).
        val_size: Training images held out for validation, stratified by class; 0: none, every
            training image trains and validation runs on the test set (``protocol=paper``).
        split_seed: Seed of the split (not of training).
        augment: Pad-crop-flip on training images.
        download: Fetch the data with torchvision when it is missing.
        num_workers: DataLoader workers.
        fast: Serve whole batches sliced from the in-memory images (``kd.data.fast``), on the
            GPU when training on one, instead of a DataLoader making each sample alone.

    Raises:
        ConfigError: On bad sizes or an unknown dataset; when the data is missing (at setup),
            with the path expected.
    """

    input_shape = (3, 32, 32)

    def __init__(
        self,
        root: str = "data",
        dataset: str = "cifar100",
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        split_seed: int = 0,
        augment: bool = True,
        download: bool = False,
        num_workers: int = 0,
        fast: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in _DATASETS:
            raise ConfigError("dataset", f"must be one of {', '.join(_DATASETS)}, got {dataset!r}")
        for name, value, low in (("batch_size", batch_size, 1), ("val_size", val_size, 0),
                                 ("split_seed", split_seed, 0), ("num_workers", num_workers, 0)):
            check_int(name, value, low, valid=f">= {low}")
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, 1, valid=">= 1 or null")
        self.root, self.dataset = str(root), dataset
        self.num_classes = 10 if dataset == "cifar10" else 100
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 4 * batch_size
        self.val_size, self.split_seed = val_size, split_seed
        self.augment, self.download, self.num_workers = augment, download, num_workers
        self.fast = bool(fast)
        self.splits: dict[str, ImageViews] = {}

    def _load(self, train: bool) -> CIFAR10:
        cls = _DATASETS[self.dataset]
        try:
            return cls(self.root, train=train, download=self.download)
        except RuntimeError as e:
            raise ConfigError(
                "data.root", f"{self.dataset} not found: expected the python pickles in "
                f"{self.root}/{cls.base_folder}; set data.download=true to fetch them with "
                f"torchvision, or data.root=<dir holding {cls.base_folder}> ({e})"
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = self._load(train=True), self._load(train=False)
        labels = np.asarray(train.targets)
        parts = self.carve_val(labels, self.val_size, self.split_seed)
        self.split_indices = parts
        images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
        targets = torch.as_tensor(labels, dtype=torch.long)
        mean, std = STATS[self.dataset]
        augment = PadCrop(padding=4, flip=True) if self.augment else None  # 162 views
        test_images = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
        test_split = ImageViews(test_images, torch.as_tensor(test.targets, dtype=torch.long), mean, std)
        val_split = ImageViews(images[parts["val"]], targets[parts["val"]], mean, std)
        self.splits = {
            "train": ImageViews(images[parts["train"]], targets[parts["train"]], mean, std, augment),
            "val": self.val_split(val_split, test_split, self.val_size),
            "test": test_split,
        }
