"""ImageNet (or any classification tree) from an ImageFolder layout, with the standard transforms.

``<root>/train/<class>/<image>`` and ``<root>/val/<class>/<image>`` (the official validation set
sorted into class folders, which is what ``torchvision.datasets.ImageNet`` also produces). The
official validation set is kd's test set; kd's validation split is ``val_per_class`` images per
class carved from the training set with a fixed seed, so model selection never sees the test set.
Training images: RandomResizedCrop + horizontal flip; evaluation: resize to 256/224 of the crop,
center crop. With ``views=E`` the training crops are instead ``E`` pre-drawn ones per image
(``CropViews``, as in FKD), distributed as the random ones, so a teacher's outputs on them can be
cached. Read with ``torchvision.datasets.ImageFolder``; classes are the sorted folder names
(WNIDs for ImageNet), the order ``torchvision.datasets.ImageNet`` uses too.

When those folders are missing but ``<root>`` holds the official ILSVRC2012 archives
(``ILSVRC2012_devkit_t12.tar.gz``, ``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar`` from
image-net.org), ``prepare_data`` (or ``setup``, whichever runs first) extracts them once with
``torchvision.datasets.ImageNet``: it checks the archives' md5 sums (minutes for the 138 GB
training archive), parses the devkit into ``<root>/meta.bin`` and sorts the validation images into
WNID folders. torchvision writes straight into ``<root>/train`` and ``<root>/val`` and later takes
any existing folder as complete, so a crash would leave a tree that looks finished; kd instead runs
it in a scratch directory ``<root>/.kd-extract-*`` (links to the archives) and renames each finished
folder into place, under a file lock (``<root>/.kd-extract.lock``) so that concurrent processes
extract once. With ``<root>/meta.bin`` present, ``class_names`` are the synsets' words
(``"tench, Tinca tinca"``), otherwise the folder names.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder, ImageNet
from torchvision.transforms import v2

from kd.data.crops import MEAN, STD, CropViews, crop_seed  # noqa: F401 (re-exported)
from kd.data.order import Key, forked_seed, split_key
from kd.data.splits import SplitDataModule
from kd.errors import ConfigError, UnreadableFile, check_int

SPLITS = ("train", "val")
# The official file names, which torchvision.datasets.ImageNet also expects.
ARCHIVES = {"devkit": "ILSVRC2012_devkit_t12.tar.gz", "train": "ILSVRC2012_img_train.tar", "val": "ILSVRC2012_img_val.tar"}
META_FILE = "meta.bin"  # torchvision's parse of the devkit: ({wnid: (word, ...)}, [wnid of each val image])
DOWNLOAD_PAGE = "https://image-net.org/challenges/LSVRC/2012/2012-downloads.php"
SCRATCH_PREFIX = ".kd-extract-"
LOCK_FILE = ".kd-extract.lock"

log = logging.getLogger(__name__)


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

    def __getitem__(self, key: Key) -> dict[str, Tensor | int]:
        """Sample ``i`` through the transform; for a key ``(i, seed)`` (``kd.data.order``) its random
        draws come from ``seed`` alone."""
        i, seed = split_key(key)
        path, target = self.folder.samples[int(self.indices[i])]
        try:
            image = self.folder.loader(path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated data
            raise UnreadableFile(f"data.root: {path} cannot be read as an image ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); remove or replace it") from e
        with forked_seed(seed):
            x = self.transform(image)
        return {"input": x, "target": target, "index": i}


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


def _archives_needed(root: Path, splits: Sequence[str]) -> list[str]:
    """The archive names that building ``splits`` needs; the devkit only while there is no meta.bin."""
    return ([] if (root / META_FILE).is_file() else [ARCHIVES["devkit"]]) + [ARCHIVES[s] for s in splits]


def _layout_error(root: Path, splits: Sequence[str], absent: Sequence[str]) -> ConfigError:
    """The error for missing ``splits`` folders without the archives ``absent`` to build them."""
    return ConfigError(
        "data.root", f"no {root / splits[0]}: expected {root}/train/<class>/<image> and {root}/val/<class>/<image>, "
        f"or the official ImageNet archives to extract them from, missing: {', '.join(str(root / a) for a in absent)} "
        f"(download them from {DOWNLOAD_PAGE}; kd extracts them once with torchvision.datasets.ImageNet)"
    )


def extract_archives(root: Path, splits: Sequence[str] = SPLITS) -> None:
    """Builds ``<root>/<split>/<wnid>/`` and ``<root>/meta.bin`` from the official archives in ``root``.

    Each split folder appears (by an atomic rename) only once it is complete, and a file lock makes
    concurrent callers wait for the one that extracts; those find the folders and return. Scratch
    directories left by a killed extraction are removed by the next one.

    Args:
        root: Directory holding the archives; the folders are built there.
        splits: Which of ``train`` and ``val`` to build; those already present are skipped.

    Raises:
        ConfigError: An archive is missing (the message names each one and where to get it), or
            torchvision cannot extract one (e.g. its md5 sum is not the official one).
    """
    splits = [s for s in splits if not (root / s).is_dir()]
    if not splits:
        return
    absent = [a for a in _archives_needed(root, splits) if not (root / a).is_file()]
    if absent:
        raise _layout_error(root, splits, absent)
    lock = FileLock(root / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to extract the ImageNet archives in %s", root)
        lock.acquire()
    try:
        # Whoever held the lock before may have built them meanwhile.
        splits = [s for s in splits if not (root / s).is_dir()]
        if not splits:
            return
        for stale in root.glob(SCRATCH_PREFIX + "*"):  # we hold the lock: no one is extracting there
            shutil.rmtree(stale, ignore_errors=True)
        log.info("extracting the ImageNet archives in %s into %s (once; hours for the full dataset)", root, ", ".join(splits))
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=root))
        try:
            # torchvision reads the archives from, and writes the folders into, the same directory.
            for name in [*ARCHIVES.values(), META_FILE]:
                if (root / name).is_file():
                    (scratch / name).symlink_to((root / name).resolve())
            for split in splits:
                ImageNet(str(scratch), split=split)
                # Each finished part goes into place at once, so a later crash keeps it; meta.bin is
                # copied, not moved, as the val split still reads it from the scratch directory.
                if not (root / META_FILE).is_file():
                    shutil.copyfile(scratch / META_FILE, scratch / "meta.bin.done")
                    os.replace(scratch / "meta.bin.done", root / META_FILE)
                os.replace(scratch / split, root / split)
        except (RuntimeError, tarfile.TarError) as e:
            message = str(e).replace(str(scratch), str(root)).splitlines()[0]
            raise ConfigError(
                "data.root", f"cannot extract the ImageNet archives in {root}: {message} (download it again from {DOWNLOAD_PAGE})"
            ) from e
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        lock.release()


def read_class_names(root: Path, wnids: Sequence[str]) -> list[str]:
    """The words of each WNID from ``<root>/meta.bin`` (``"tench, Tinca tinca"``), else the WNID itself.

    Args:
        root: Directory that may hold torchvision's ``meta.bin``.
        wnids: Class folder names, in class-index order.

    Returns:
        One name per class.
    """
    if not (root / META_FILE).is_file():
        return list(wnids)
    words, _ = torch.load(root / META_FILE, weights_only=True)
    return [", ".join(words[w]) if w in words else w for w in wnids]


class ImageNetDataModule(SplitDataModule):
    """ImageNet from ``<root>/train`` and ``<root>/val`` class folders, or from the official archives.

    Args:
        root: Directory holding ``train/`` and ``val/``, or the three ILSVRC2012 archives to build
            them from (once, in ``prepare_data``).
        num_classes: Classes expected (1000 for ImageNet); checked against the folders.
        image_size: Side of the training and evaluation crops (224).
        batch_size: Training batch size.
        eval_batch_size: Batch size for val and test (defaults to ``batch_size``).
        val_per_class: Training images per class held out for validation.
        split_seed: Seed of that split.
        num_workers: DataLoader workers (decoding JPEGs needs several).
        views: None: a fresh random crop of each training image every time. An integer ``E``:
            ``E`` crops pre-drawn per training image (``CropViews``, FKD), one of which is served
            each time, so the teacher's outputs on every training input can be cached.
        views_seed: Seed of those crops.

    Attributes:
        class_names: After ``setup``, the name of each class: its words from ``<root>/meta.bin``
            when there is one (``"tench, Tinca tinca"``), else its folder name.

    Raises:
        ConfigError: On bad sizes; at ``prepare_data`` or ``setup``, on missing folders without
            the archives to build them (naming the missing files) or an archive torchvision cannot
            extract; at ``setup``, on a class count other than ``num_classes``.
    """

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
        views: int | None = None,
        views_seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 2), ("image_size", image_size, 8),
                                 ("batch_size", batch_size, 1), ("val_per_class", val_per_class, 1),
                                 ("split_seed", split_seed, 0), ("num_workers", num_workers, 0)):
            check_int(name, value, low, valid=f">= {low}")
        if views is not None:
            check_int("views", views, 1, valid=">= 1 (crops pre-drawn per training image), or null for fresh random crops")
        check_int("views_seed", views_seed, 0, valid=">= 0")
        self.views, self.views_seed = views, views_seed
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
        self.splits: dict[str, IndexedImages | CropViews] = {}
        self.class_names: list[str] = []

    def prepare_data(self) -> None:
        """Extracts the official archives into ``train/`` and ``val/`` if those are missing (once).

        Raises:
            ConfigError: Folders missing and so are archives (named in the message), or an
                archive cannot be extracted.
        """
        extract_archives(self.root)

    def _folder(self, split: str) -> ImageFolder:
        path = self.root / split
        folder = ImageFolder(str(path))
        if len(folder.classes) != self.num_classes:
            raise ConfigError("data.num_classes", f"is {self.num_classes} but {path} has {len(folder.classes)} class folders")
        return folder

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        # Callers may need the data before the Trainer runs prepare_data (train_targets for CRD);
        # a no-op once the folders exist, and the lock keeps concurrent ranks from extracting twice.
        self.prepare_data()
        train, test = self._folder("train"), self._folder("val")
        if train.classes != test.classes:
            raise ConfigError("data.root", f"{self.root}/train and {self.root}/val have different class folders")
        self.class_names = read_class_names(self.root, train.classes)
        train_idx, val_idx = _carve(np.asarray(train.targets), self.val_per_class, self.split_seed)
        self.split_indices = {"train": train_idx, "val": val_idx}
        self.splits = {
            "train": IndexedImages(train, train_idx, self.train_transform) if self.views is None
            else CropViews(train, train_idx, self.input_shape[-1], self.views, self.views_seed),
            "val": IndexedImages(train, val_idx, self.eval_transform),
            "test": IndexedImages(test, np.arange(len(test)), self.eval_transform),
        }
