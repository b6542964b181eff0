"""The fast data path for datasets that fit in memory: whole batches sliced from tensors.

A ``torch.utils.data.DataLoader`` over an in-memory dataset still makes every sample alone
(``__getitem__``, one transform call per image) and collates them: on CIFAR that is most of a
small student's step on a CPU. ``BatchLoader`` draws a permutation and a view per sample
(``kd.data.views``), then renders each batch with one gather on the uint8 images, which may
live on the GPU. Under DDP each rank takes its share of one shared permutation, padded like
``DistributedSampler`` so that every rank runs the same number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from kd.data.order import check_order_seed


class BatchSource(Protocol):
    """What ``BatchLoader`` needs of a dataset (``ImageViews``, ``IndexedTensorDataset``)."""

    num_views: int

    def __len__(self) -> int: ...

    def batch(self, index: Tensor, views: Tensor) -> dict[str, Tensor]: ...


class BatchLoader:
    """Yields dict batches of a ``BatchSource``, each made in one call.

    Args:
        dataset: The split.
        batch_size: Samples per batch (per rank under DDP).
        shuffle: A fresh permutation and fresh views every epoch (training); else the samples in
            order, in their first view (evaluation).
        seed: Seed of the permutations and views; epoch ``e`` uses ``seed + e``, so every rank
            of a DDP group draws the same ones.
        rank: This process's rank.
        world_size: Number of ranks that share the data.
        drop_last: Drop the last incomplete batch.

    Raises:
        ValueError: On a batch size < 1 or a rank outside ``[0, world_size)``.
    """

    def __init__(self, dataset: BatchSource, batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.served = 0  # batches of the current iteration handed out
        self._start = 0  # batches to skip in the next iteration (resumed mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose permutation and views the next iteration draws."""
        self.epoch = epoch

    def _per_rank(self) -> int:
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _indices(self, generator: torch.Generator) -> Tensor:
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        total = self._per_rank() * self.world_size
        if total > n:  # pad with the first samples, as DistributedSampler does
            order = torch.cat([order, order[: total - n]])
        return order[self.rank :: self.world_size].contiguous()  # its batches copy to a GPU without staging

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        index = self._indices(generator)  # (n,)
        if self.shuffle and self.dataset.num_views > 1:
            # drawn for the whole permutation, then sliced: the same on every rank
            views = torch.randint(self.dataset.num_views, (len(index) * self.world_size,), generator=generator)
            views = views[self.rank :: self.world_size].contiguous()
        else:
            views = torch.zeros(len(index), dtype=torch.long)
        self.epoch += 1  # the next iteration draws anew, also when nobody calls set_epoch
        start, self._start = self._start, 0
        self.served = start
        for b in range(start, len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            batch = self.dataset.batch(index[sl], views[sl])
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch being served and how many of its batches were handed out (Lightning saves it
        in checkpoints), so a resumed run continues with the next batch."""
        return {"epoch": self.epoch - 1 if self.served else self.epoch, "batches": self.served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_order_seed(state, self.seed)
        done = int(state["batches"]) >= len(self)  # saved after the epoch's last batch
        self.epoch = int(state["epoch"]) + (1 if done else 0)
        self._start = 0 if done else int(state["batches"])
