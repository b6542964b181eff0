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


def write_cifar(root: Path, dataset: str = "cifar100", n_train: int = 300, n_test: int = 60, seed: int = 0,
                labels_used: int | None = None) -> Path:
    """Writes CIFAR python pickles as torchvision reads them (``cifar-100-python/{train,test,meta}``
    or ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``). Labels cycle through
    the first ``labels_used`` classes (default: all)."""
    rng = np.random.default_rng(seed)
    classes = labels_used or (100 if dataset == "cifar100" else 10)
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


def write_imagenet_archives(root: Path, classes: int = 3, per_class: int = 6, val_per_class: int = 2, seed: int = 0) -> Path:
    """Writes the three official ILSVRC2012 archives into ``root``, in their real formats, with tiny JPEGs.

    - ``ILSVRC2012_devkit_t12.tar.gz``: ``ILSVRC2012_devkit_t12/data/meta.mat`` (the ``synsets``
      struct array with the devkit's fields, ordered by ILSVRC2012_ID: ``classes`` leaf synsets with
      ``num_children`` 0, whose IDs are a permutation of ``1..classes`` not in WNID order, as in the
      real file, then one non-leaf synset ``n00001740`` "entity" whose children are all the leaves)
      and ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID
      per validation image, in file-name order).
    - ``ILSVRC2012_img_train.tar``: one ``<wnid>.tar`` per class holding ``<wnid>_<n>.JPEG``.
    - ``ILSVRC2012_img_val.tar``: ``ILSVRC2012_val_<8 digits>.JPEG``, the classes shuffled.

    Class ``c`` (the index in sorted-WNID order, as torchvision and ImageFolder number them) has WNID
    ``n1<c * 1111:07d>``, words ``"object <c>, thing <c>"``, and its images are uniformly gray with
    level ``round(255 * (c + 0.5) / classes)``, so a test can read the label back from the pixels.
    Their md5 sums are not the official ones that torchvision checks (tests patch those).

    Args:
        root: Directory to write the archives into (created).
        classes: Leaf synsets (classes).
        per_class: Training images per class.
        val_per_class: Official validation images per class (kd's test set).
        seed: Seed of the image sizes, the ID permutation and the validation order.

    Returns:
        ``root``.
    """
    import io
    import tarfile

    from PIL import Image
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    wnids = [f"n1{c * 1111:07d}" for c in range(classes)]
    ids = rng.permutation(classes) + 1  # ids[c]: ILSVRC2012_ID of class c

    def jpeg(c: int) -> bytes:
        h, w = (int(s) for s in rng.integers(8, 41, size=2))
        level = round(255 * (c + 0.5) / classes)
        buffer = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), level, dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    synset_fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    synsets = np.zeros((classes + 1, 1), dtype=[(name, object) for name in synset_fields])
    for row, c in enumerate(np.argsort(ids)):  # rows in ILSVRC2012_ID order
        synsets[row, 0] = (np.uint16(ids[c]), wnids[c], f"object {c}, thing {c}", f"the gloss of object {c}", np.uint8(0),
                           np.zeros((1, 0), dtype=np.uint8), np.uint8(0), np.uint16(per_class))
    synsets[classes, 0] = (np.uint16(classes + 1), "n00001740", "entity", "that which is perceived to exist", np.uint8(classes),
                           ids.astype(np.uint16).reshape(1, -1), np.uint8(18), np.uint16(0))
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    val_classes = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    ground_truth = "".join(f"{ids[c]}\n" for c in val_classes).encode()
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth)

    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as train:
        for c, wnid in enumerate(wnids):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for n in range(per_class):
                    add(tar, f"{wnid}_{n + 1}.JPEG", jpeg(c))
            add(train, f"{wnid}.tar", inner.getvalue())

    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for i, c in enumerate(val_classes):
            add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(int(c)))
    return root
