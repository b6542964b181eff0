"""Small datasets written in the real on-disk formats, for tests (nothing is downloaded)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def write_mnist(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """Writes ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (the real format)."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)  # every class present
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def write_cifar(root: Path, dataset: str = "cifar100", n_train: int = 300, n_test: int = 60, seed: int = 0) -> Path:
    """Writes CIFAR python pickles as torchvision reads them (``cifar-100-python/{train,test,meta}``
    or ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``)."""
    rng = np.random.default_rng(seed)
    classes = 100 if dataset == "cifar100" else 10
    folder = root / ("cifar-100-python" if dataset == "cifar100" else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if dataset == "cifar100" else "labels"

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), label_key: [i % classes for i in range(n)]}

    def dump(name: str, obj: dict) -> None:
        (folder / name).write_bytes(pickle.dumps(obj))

    if dataset == "cifar100":
        dump("train", batch(n_train))
        dump("test", batch(n_test))
        dump("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    else:
        for i in range(1, 6):
            dump(f"data_batch_{i}", batch(n_train // 5))
        dump("test_batch", batch(n_test))
        dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return root


def write_image_folder(root: Path, classes: int = 3, per_class: int = 6, test_per_class: int = 2, seed: int = 0) -> Path:
    """Writes ``<root>/{train,val}/<class>/<n>.JPEG`` with small random RGB images of varied sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", test_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", format="JPEG")
    return root
