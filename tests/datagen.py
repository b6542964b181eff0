"""Small datasets written in the real on-disk formats, for tests (nothing is downloaded)."""

from __future__ import annotations

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
