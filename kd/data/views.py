"""Augmentation drawn as an index: the finite set of views of an image, rendered exactly in batches.

CIFAR's training augmentation (pad 4 px with zeros, random 32 x 32 crop, random horizontal flip)
has 9 x 9 crop offsets x 2 flips = 162 views per image; Hinton's MNIST jitter (a shift of up to
2 px with zero fill) has 5 x 5 = 25. Drawing the view as an integer and rendering it with
``PadCrop.apply`` gives the same distribution as ``v2.RandomCrop(32, padding=4)`` followed by
``v2.RandomHorizontalFlip()``, and makes every training input nameable by ``(index, view)``:
what the teacher-output cache (``kd.teacher.cache``) is keyed on. Rendering works on whole batches of
uint8 images (on any device), with no per-sample PIL or ``transforms`` work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd.data.order import Key, sample_generator, split_key


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device`` without the host waiting for the device's queued work.

    A plain copy from host memory onto a GPU (``tensor.to("cuda")``) waits for every kernel already
    queued; CUDA may wait as well for a copy from pageable memory even when asked not to (its
    documented API synchronisation behaviour). So a host tensor bound for a GPU is staged in pinned
    memory (torch's caching host allocator, which keeps the block until the copy is done) and copied
    with ``non_blocking``: the copy is queued behind the step's kernels. A strided slice (a rank's
    share of a permutation) is made contiguous first: torch would stage a non-contiguous source in
    pageable memory again. A copy back to the host blocks: its values are read at once. A no-op
    where it already is.
    """
    device = torch.device(device)
    from_host = tensor.device.type == "cpu"
    if device.type == "cuda" and from_host and not (tensor.is_contiguous() and tensor.is_pinned()):
        tensor = tensor.contiguous().pin_memory()
    return tensor.to(device, non_blocking=from_host)


class PadCrop:
    """Zero-pad by ``padding`` px, crop back to the image size at one of the offsets, maybe flip.

    View ``v`` is decoded as ``flip = v % 2`` (when ``flip``), then ``top, left`` in
    ``[0, 2 * padding]`` from ``v // 2`` (row-major); ``top = left = padding`` is the plain image.

    Args:
        padding: Pad width in px (CIFAR: 4; Hinton's MNIST jitter: 2).
        flip: Whether a horizontal flip is part of the view.
    """

    def __init__(self, padding: int, flip: bool) -> None:
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = padding
        self.flip = flip
        self.offsets = 2 * padding + 1
        self.num_views = self.offsets**2 * (2 if flip else 1)

    def spec(self) -> dict[str, Any]:
        """What decides the views, for cache keys."""
        return {"kind": "pad_crop", "padding": self.padding, "flip": self.flip, "fill": 0}

    def decode(self, views: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(top, left, flipped)`` of each view, each ``(B,)``."""
        flipped = (views % 2).bool() if self.flip else torch.zeros_like(views, dtype=torch.bool)
        offset = views // 2 if self.flip else views
        return offset // self.offsets, offset % self.offsets, flipped

    def apply_one(self, image: Tensor, view: int) -> Tensor:
        """``apply`` for one image ``(C, H, W)`` and one view, by slicing (the DataLoader path)."""
        h, w = image.shape[-2:]
        flipped = bool(view % 2) if self.flip else False
        top, left = divmod(view // 2 if self.flip else view, self.offsets)
        p = self.padding
        x = torch.nn.functional.pad(image, (p, p, p, p))[:, top : top + h, left : left + w]  # (C, H, W)
        return x.flip(-1) if flipped else x

    def apply(self, images: Tensor, views: Tensor) -> Tensor:
        """Renders view ``views[b]`` of ``images[b]``.

        Args:
            images: ``(B, C, H, W)`` of any dtype.
            views: ``(B,)`` integers in ``[0, num_views)``.

        Returns:
            ``(B, C, H, W)``, the same dtype and device as ``images``.
        """
        b, c, h, w = images.shape
        p = self.padding
        views = to_device(views, images.device).long()
        top, left, flipped = self.decode(views)
        padded = torch.nn.functional.pad(images, (p, p, p, p))  # (B, C, H + 2p, W + 2p), zero fill
        ar_h = torch.arange(h, device=images.device)
        ar_w = torch.arange(w, device=images.device)
        rows = top[:, None] + ar_h  # (B, H)
        cols = left[:, None] + torch.where(flipped[:, None], w - 1 - ar_w, ar_w)  # (B, W)
        bi = torch.arange(b, device=images.device)[:, None, None, None]
        ci = torch.arange(c, device=images.device)[None, :, None, None]
        return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


class ImageViews(Dataset):
    """uint8 images held in memory, served as normalised float in one of their views.

    ``render(index, views)`` is the one place inputs are made: ``__getitem__`` (the DataLoader
    path) draws a view and renders one image, ``kd.data.fast.BatchLoader`` renders whole batches,
    and the teacher-output cache enumerates every ``(index, view)`` through it.

    Args:
        images: ``(N, C, H, W)`` uint8.
        targets: ``(N,)`` labels.
        mean: Per-channel mean of the images in ``[0, 1]``.
        std: Per-channel std.
        augment: The views of a training split, or None (one view: the image itself).
    """

    def __init__(self, images: Tensor, targets: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 augment: PadCrop | None = None) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, C, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = targets
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.num_views = augment.num_views if augment is not None else 1
        self._mean = torch.tensor(self.mean).view(-1, 1, 1).to(images.device)  # (C, 1, 1), where the images are
        self._std = torch.tensor(self.std).view(-1, 1, 1).to(images.device)

    def __len__(self) -> int:
        return len(self.targets)

    def spec(self) -> dict[str, Any]:
        """How inputs are made from the stored images, for cache keys."""
        return {"normalize": [self.mean, self.std], "views": self.augment.spec() if self.augment else None}

    def to(self, device: torch.device | str) -> ImageViews:
        """The same dataset with its images and targets on ``device``."""
        moved = ImageViews(self.images.to(device), self.targets.to(device), self.mean, self.std, self.augment)
        return moved

    def draw_views(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n,)`` views drawn uniformly (all 0 without augmentation)."""
        if self.num_views == 1:
            return torch.zeros(n, dtype=torch.long)
        return torch.randint(self.num_views, (n,), generator=generator)

    def render(self, index: Tensor, views: Tensor) -> Tensor:
        """The normalised float inputs ``(B, C, H, W)`` of images ``index`` in views ``views``."""
        x = self.images[to_device(index, self.images.device)]  # (B, C, H, W) uint8
        if self.augment is not None:
            x = self.augment.apply(x, views)
        return self.normalize(x)

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 images ``(B, C, H, W)`` as the split's float inputs."""
        return (x.float() / 255.0 - self._mean) / self._std

    def batch(self, index: Tensor, views: Tensor) -> dict[str, Tensor]:
        """A training batch as every kd datamodule yields it, plus the view of each input."""
        index, views = to_device(index, self.images.device), to_device(views, self.images.device)
        return {"input": self.render(index, views), "target": self.targets[index], "index": index, "view": views}

    def __getitem__(self, key: Key) -> dict[str, Tensor | int]:
        """Sample ``i`` in a random view; with a key ``(i, seed)`` (``kd.data.order``) the view is drawn from ``seed``."""
        i, seed = split_key(key)
        view = int(torch.randint(self.num_views, (), generator=sample_generator(seed))) if self.num_views > 1 else 0
        x = self.images[i]  # (C, H, W) uint8
        if self.augment is not None:
            x = self.augment.apply_one(x, view)
        return {"input": (x.float() / 255.0 - self._mean) / self._std, "target": self.targets[i], "index": i, "view": view}


class WrappedSplit:
    """A training split whose items and batches carry more (``kd.data.pairs``, ``kd.data.strong``):
    its length, views, targets and spec are the split's own.

    Args:
        base: The split.
    """

    def __init__(self, base: Any) -> None:
        self.base = base
        self.targets = base.targets

    def __len__(self) -> int:
        return len(self.base)

    @property
    def num_views(self) -> int:
        return int(getattr(self.base, "num_views", 1))

    def spec(self) -> dict[str, Any]:
        return self.base.spec()
