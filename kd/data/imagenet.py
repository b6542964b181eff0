"""ImageNet (or any classification tree) from an ImageFolder layout, with the standard transforms.

``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>`` (the official validation set
sorted into class folders, which is what ``torchvision.datasets.ImageNet`` also produces). The
official validation set is kd's test set; kd's validation split is ``val_per_class`` images per
class carved from the training set with a fixed seed, so model selection never sees the test set.
Training images: RandomResizedCrop + horizontal flip; evaluation: resize to 256/224 of the crop,
center crop. Read with ``torchvision.datasets.ImageFolder``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from kd.data.splits import SplitDataModule
from kd.errors import ConfigError, check_int

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class IndexedImages(Dataset):
    """Items of an ImageFolder subset as ``{"input", "target", "index"}`` through a transform.

    Args:
        folder: The ImageFolder.
        indices: Which of its samples, in order; ``index`` is the position in this list.
        transform: Applied to each PIL image.
    """

    def __init__(self, folder: ImageFolder, indices: np.ndarray, transform: v2.Transform) -> None:
        self.folder = folder
        self.indices = indices
        self.transform = transform
        self.targets = torch.as_tensor(np.asarray(folder.targets)[indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor | int]:
        path, target = self.folder.samples[int(self.indices[i])]
        return {"input": self.transform(self.folder.loader(path)), "target": target, "index": i}


def _carve(targets: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` random samples of each class for validation, the rest for training."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        if len(members) <= per_class:
            raise ConfigError("data.val_per_class", f"class {c} has {len(members)} training images, not more than {per_class}")
        val.append(rng.choice(members, per_class, replace=False))
    val_idx = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(targets)), val_idx), val_idx


class ImageNetDataModule(SplitDataModule):
    """ImageNet from ``<root>/train`` and ``<root>/val`` class folders.

    Args:
        root: Directory holding ``train/`` and ``val/``.
        num_classes: Classes expected (1000 for ImageNet); checked against the folders.
        image_size: Side of the training and evaluation crops (224).
        batch_size: Training batch size.
        eval_batch_size: Batch size for val and test (defaults to ``batch_size``).
        val_per_class: Training images per class held out for validation.
        split_seed: Seed of that split.
        num_workers: DataLoader workers (decoding JPEGs needs several).

    Raises:
        ConfigError: On bad sizes; at setup, on a missing folder (with the expected layout) or a
            class count other than ``num_classes``.
    """

    pin_memory = True

    def __init__(
        self,
        root: str = "data/imagenet",
        num_classes: int = 1000,
        image_size: int = 224,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        val_per_class: int = 10,
        split_seed: int = 0,
        num_workers: int = 8,
    ) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 2), ("image_size", image_size, 8),
                                 ("batch_size", batch_size, 1), ("val_per_class", val_per_class, 1),
                                 ("split_seed", split_seed, 0), ("num_workers", num_workers, 0)):
            check_int(name, value, low, valid=f">= {low}")
        self.root = Path(root)
        self.num_classes = num_classes
        self.input_shape = (3, image_size, image_size)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_per_class, self.split_seed, self.num_workers = val_per_class, split_seed, num_workers
        normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        self.train_transform = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *normalize])
        resize = round(image_size * 256 / 224)
        self.eval_transform = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *normalize])
        self.splits: dict[str, IndexedImages] = {}

    def _folder(self, split: str) -> ImageFolder:
        path = self.root / split
        if not path.is_dir():
            raise ConfigError(
                "data.root", f"no {path}: expected {self.root}/train/<class>/<image> and "
                f"{self.root}/val/<class>/<image> (ImageNet: download it from image-net.org, then sort "
                "the validation images into class folders, e.g. with torchvision.datasets.ImageNet)"
            )
        folder = ImageFolder(str(path))
        if len(folder.classes) != self.num_classes:
            raise ConfigError("data.num_classes", f"is {self.num_classes} but {path} has {len(folder.classes)} class folders")
        return folder

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = self._folder("train"), self._folder("val")
        if train.classes != test.classes:
            raise ConfigError("data.root", f"{self.root}/train and {self.root}/val have different class folders")
        train_idx, val_idx = _carve(np.asarray(train.targets), self.val_per_class, self.split_seed)
        self.split_indices = {"train": train_idx, "val": val_idx}
        self.splits = {
            "train": IndexedImages(train, train_idx, self.train_transform),
            "val": IndexedImages(train, val_idx, self.eval_transform),
            "test": IndexedImages(test, np.arange(len(test)), self.eval_transform),
        }
