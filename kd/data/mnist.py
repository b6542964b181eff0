"""MNIST through torchvision, held in memory as uint8, with Hinton 2015's jitter of up to 2 px.

60,000 training and 10,000 test images of 28x28 handwritten digits. A validation split of
``val_size`` images is carved from the training set (stratified, fixed ``split_seed``), so model
selection never sees the test set. Read with ``torchvision.datasets.MNIST`` from
``<root>/MNIST/raw`` (the idx files); ``download=true`` fetches them with torchvision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd.data.splits import SplitDataModule
from kd.data.views import ImageViews, PadCrop
from kd.errors import ConfigError, check_int

MEAN, STD = 0.1307, 0.3081  # of the MNIST training images, in [0, 1]


def check_idx(path: Path) -> int:
    """Checks an idx file (LeCun's format: a magic number giving the element type and the number of
    dimensions, the dimensions, then the data) holds exactly the data its header announces.

    Returns:
        Its first dimension: the number of images or labels.

    Raises:
        ConfigError: Naming the file, with the size its header implies and the size found.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        header = f.read(4)
        ndim = header[3] if len(header) == 4 else 0
        dims_bytes = f.read(4 * ndim)
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(header[2] if len(header) == 4 else -1)
    if len(header) < 4 or header[:2] != b"\x00\x00" or itemsize is None or not 1 <= ndim <= 3 or len(dims_bytes) < 4 * ndim:
        raise ConfigError("data.root", f"MNIST is corrupt: {path} is not an idx file ({size} bytes, no valid header); "
                          "replace it (data.download=true fetches it)")
    dims = [int.from_bytes(dims_bytes[4 * i: 4 * i + 4], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + itemsize * int(np.prod(dims))
    if size != expected:
        raise ConfigError("data.root", f"MNIST is corrupt: {path} is {size} bytes, its header ({' x '.join(map(str, dims))}) "
                          f"needs {expected}; replace it (data.download=true fetches it)")
    return dims[0]


class MNISTDataModule(SplitDataModule):
    """MNIST: train / val (carved from train) / test, in memory.

    Args:
        root: Directory holding ``MNIST/raw`` (torchvision's layout).
        batch_size: Training batch size.
        eval_batch_size: Batch size for val and test (defaults to 4x ``batch_size``).
        val_size: Training images held out for validation, stratified by class; 0: none, every
            training image trains and validation runs on the test set (``protocol=paper``).
        split_seed: Seed of the split (not of training).
        jitter: Random shift of training images, up to this many pixels (0: none).
        download: Fetch the data with torchvision when it is missing.
        num_workers: DataLoader workers.
        fast: Serve whole batches sliced from the in-memory tensors (``kd.data.fast``), on the
            GPU when training on one, instead of a DataLoader making each sample alone.

    Raises:
        ConfigError: On bad sizes; when the data is missing (at setup), with the path expected.
    """

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        split_seed: int = 0,
        jitter: int = 0,
        download: bool = False,
        num_workers: int = 0,
        fast: bool = False,
    ) -> None:
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("val_size", val_size, 0),
                                 ("split_seed", split_seed, 0), ("jitter", jitter, 0), ("num_workers", num_workers, 0)):
            check_int(name, value, low, valid=f">= {low}")
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, 1, valid=">= 1 or null")
        self.root = str(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 4 * batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.jitter = jitter
        self.download = download
        self.num_workers = num_workers
        self.fast = bool(fast)
        self.splits: dict[str, ImageViews] = {}

    def _load(self, train: bool):  # noqa: ANN202 - a torchvision MNIST
        from torchvision.datasets import MNIST

        raw = Path(self.root) / "MNIST" / "raw"
        prefix = "train" if train else "t10k"
        images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
        if images.is_file() and labels.is_file():  # present: then it must be whole
            n_images, n_labels = check_idx(images), check_idx(labels)
            if n_images != n_labels:
                raise ConfigError("data.root", f"MNIST is corrupt: {images} holds {n_images} images but {labels} "
                                  f"{n_labels} labels; replace both (data.download=true fetches them)")
        try:
            return MNIST(self.root, train=train, download=self.download)
        except RuntimeError as e:
            raise ConfigError(
                "data.root", f"MNIST not found: expected the idx files (train-images-idx3-ubyte, ...) in "
                f"{self.root}/MNIST/raw; set data.download=true to fetch them with torchvision, or "
                f"data.root=<dir holding MNIST/raw> ({e})"
            ) from None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train, test = self._load(train=True), self._load(train=False)
        labels = np.asarray(train.targets)
        parts = self.carve_val(labels, self.val_size, self.split_seed)
        self.split_indices = parts
        images, targets = train.data.unsqueeze(1), train.targets.long()  # (N, 1, 28, 28) uint8, (N,)
        # Hinton's jitter: a shift in [-jitter, jitter] px with zero fill, (2 jitter + 1)^2 views
        jitter = PadCrop(padding=self.jitter, flip=False) if self.jitter else None
        test_split = ImageViews(test.data.unsqueeze(1), test.targets.long(), (MEAN,), (STD,))
        self.splits = {
            "train": ImageViews(images[parts["train"]], targets[parts["train"]], (MEAN,), (STD,), jitter),
            "val": self.val_split(ImageViews(images[parts["val"]], targets[parts["val"]], (MEAN,), (STD,)), test_split,
                                  self.val_size),
            "test": test_split,
        }
