"""FKD-style pre-drawn crops: a finite set of RandomResizedCrop + flip views per image, so a
teacher's outputs on every training input can be computed once and stored (``kd.teacher.cache``).

FKD: Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022,
arXiv:2112.01528.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from kd.data.order import Key, forked_seed, sample_generator, split_key
from kd.errors import check_int

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's channel statistics

def crop_seed(seed: int, i: int, view: int) -> int:
    """The seed of view ``view`` of image ``i``: a stable 63-bit hash of the three (not Python's ``hash``)."""
    digest = hashlib.blake2b(f"{int(seed)},{int(i)},{int(view)}".encode(), digest_size=8).digest()  # tensors too
    return int.from_bytes(digest, "little") >> 1


class CropViews(Dataset):
    """An ImageFolder subset in ``num_views`` pre-drawn RandomResizedCrop + flip views per image (FKD).

    FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022,
    arXiv:2112.01528) fixes, for every training image, a finite set of crops whose teacher outputs
    are stored once. View ``v`` of image ``i`` is drawn by torchvision's own
    ``RandomResizedCrop.get_params`` (10 attempts, then the centre crop clamped to the ratio range)
    followed by ``rand() < 0.5`` for the flip, on the global generator seeded with ``crop_seed(seed,
    i, v)`` and restored afterwards: the numbers ``v2.Compose([RandomResizedCrop,
    RandomHorizontalFlip])`` draws from a global RNG so seeded, so each view is distributed exactly
    as the random transform. Views are rendered on the decoded uint8 tensor (bilinear, antialiased), then scaled
    to ``[0, 1]`` and normalised with ``MEAN`` / ``STD``.

    Args:
        folder: The ImageFolder.
        indices: Which of its samples, in order; ``index`` (and ``i`` above) is the position in this list.
        image_size: Side ``S`` of the square crops.
        num_views: Views per image (FKD: one per epoch).
        seed: Seed of the views.
        scale: Range of the crop's area, as a fraction of the image's.
        ratio: Range of the crop's aspect ratio (width / height).

    Raises:
        ConfigError: If ``num_views`` is not an integer >= 1 or ``seed`` not one >= 0.
    """

    def __init__(self, folder: ImageFolder, indices: np.ndarray, image_size: int, num_views: int, seed: int,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.num_views = check_int("views", num_views, 1, valid=">= 1")
        self.seed = check_int("views_seed", seed, 0, valid=">= 0")
        self.folder = folder
        self.indices = indices
        self.image_size = image_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        # in float32 first, as torchvision computes it, so that the drawn numbers are the same
        self.targets = torch.as_tensor(np.asarray(folder.targets)[indices], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def spec(self) -> dict[str, Any]:
        """What decides the inputs besides the files' contents, for cache keys."""
        return {"kind": "random_resized_crop", "size": self.image_size, "scale": list(self.scale), "ratio": list(self.ratio),
                "flip": True, "seed": self.seed, "num_views": self.num_views, "interpolation": "bilinear", "antialias": True,
                "draw": "torch.Generator(crop_seed(seed, i, view)): RandomResizedCrop params, then rand < 0.5 flips",
                "normalize": [list(MEAN), list(STD)]}

    def content_digest(self) -> str:
        """SHA-256 of each sample's path relative to the folder root, file size and target, in order.

        Reading every byte of ImageNet's 140 GB would take longer than training an epoch; a file
        rewritten in place at the same size goes unnoticed (the cache's spot checks against the
        teacher are what catch that).
        """
        h = hashlib.sha256()
        root = Path(self.folder.root)
        for k in self.indices:
            path, target = self.folder.samples[int(k)]
            h.update(f"{Path(path).relative_to(root).as_posix()}\0{os.stat(path).st_size}\0{target}\n".encode())
        return h.hexdigest()

    def draw_views(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n,)`` views drawn uniformly."""
        return torch.randint(self.num_views, (n,), generator=generator)

    def crop(self, i: int, view: int, width: int, height: int) -> tuple[int, int, int, int, bool]:
        """``(top, left, h, w, flipped)`` of view ``view`` of image ``i``, a ``width`` x ``height`` image.

        torchvision's own ``RandomResizedCrop.get_params``, then the draw of
        ``RandomHorizontalFlip(0.5)``, on the global generator seeded with ``crop_seed(seed, i,
        view)`` and restored afterwards (``kd.data.order.forked_seed``).
        """
        shape = torch.empty(()).expand(3, height, width)  # what get_params reads: the size, no pixels
        with forked_seed(crop_seed(self.seed, i, view)):
            top, left, h, w = transforms.RandomResizedCrop.get_params(shape, list(self.scale), list(self.ratio))
            flipped = bool(torch.rand(1).item() < 0.5)
        return int(top), int(left), int(h), int(w), flipped

    def _load(self, i: int) -> Tensor:
        """Image ``i`` decoded, ``(3, H, W)`` uint8."""
        return v2.functional.pil_to_tensor(self.folder.loader(self.folder.samples[int(self.indices[i])][0]))

    def _view(self, image: Tensor, i: int, view: int) -> Tensor:
        """View ``view`` of image ``i`` (``image``, ``(3, H, W)`` uint8), normalised ``(3, S, S)`` float32."""
        top, left, h, w, flipped = self.crop(i, view, image.shape[-1], image.shape[-2])
        s = self.image_size
        x = v2.functional.resized_crop(image, top, left, h, w, [s, s], antialias=True)  # (3, S, S) uint8, bilinear
        if flipped:
            x = v2.functional.horizontal_flip(x)
        # the kernels v2.ToDtype(scale=True) and v2.Normalize run, for the same float numbers
        return v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True), MEAN, STD)

    def render(self, index: Tensor, views: Tensor) -> Tensor:
        """The normalised float inputs ``(B, 3, S, S)`` of images ``index`` ``(B,)`` in views ``views`` ``(B,)``.

        Each distinct image is decoded once, however many of its views the batch holds.
        """
        index, views = index.cpu().tolist(), views.cpu().tolist()
        out = torch.empty(len(index), 3, self.image_size, self.image_size)  # (B, 3, S, S)
        positions: dict[int, list[int]] = {}
        for b, i in enumerate(index):
            positions.setdefault(i, []).append(b)
        for i, bs in positions.items():
            image = self._load(i)  # (3, H, W) uint8
            for b in bs:
                out[b] = self._view(image, i, views[b])
        return out

    def __getitem__(self, key: Key) -> dict[str, Tensor | int]:
        """Image ``i`` in a random view: drawn from ``seed`` for a key ``(i, seed)`` (``kd.data.order``), else
        from the global generator."""
        i, seed = split_key(key)
        view = int(torch.randint(self.num_views, (), generator=sample_generator(seed)))
        return {"input": self._view(self._load(i), i, view), "target": int(self.targets[i]), "index": i, "view": view}
