"""Training data order and augmentation as functions of (seed, epoch, position): resumable exactly.

A plain ``DataLoader(shuffle=True)`` draws each epoch's permutation from the global generator
when the epoch's iterator is made, and each worker draws augmentations from a stream seeded at
that moment; a run restarted mid-epoch cannot draw them again. Here epoch ``e`` draws its
permutation, and one seed per position, from ``torch.Generator().manual_seed(seed + e)``; a
dataset item is asked for as ``(index, sample_seed)`` and draws its augmentation from that seed
alone (``sample_generator``, ``forked_seed``). So the inputs of a step do not depend on how many
workers there are, which worker made them, or whether the run was restarted; and the loader's
``state_dict`` (the epoch and how many batches it served) is all Lightning needs to continue
mid-epoch with the very next batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

Key = int | tuple[int, int]  # a dataset key: an index, or (index, sample seed)


def split_key(key: Any) -> tuple[int, int | None]:
    """``(index, sample_seed)`` of a dataset key; the seed is None for a plain index."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


def sample_generator(seed: int | None) -> torch.Generator | None:
    """A generator seeded with a sample's seed, or None (the global one) for a plain index."""
    return None if seed is None else torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def forked_seed(seed: int | None) -> Iterator[None]:
    """Runs the block on the global CPU generator seeded with ``seed``, then restores it.

    For transforms that draw from the global generator (torchvision's ``RandomResizedCrop``).
    With ``seed`` None the block runs on the global generator as it is.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_order_seed(state: dict[str, int], seed: int) -> None:
    """Refuses a loader state saved under another data-order seed.

    Raises:
        ValueError: Naming both seeds.
    """
    if int(state["seed"]) != seed:
        raise ValueError(f"the checkpoint's data order has seed {state['seed']}, this run {seed}: "
                         "resume with the run's own seed")


class EpochSampler(DistributedSampler):
    """Keys ``(index, sample_seed)`` of one rank's share of epoch ``e``, drawn from ``seed + e``.

    A ``DistributedSampler`` (so Lightning leaves it in place under DDP) whose order is
    ``DistributedSampler``'s: a permutation of ``seed + epoch``, padded with its first samples to a
    multiple of ``world_size``, rank ``r`` taking every ``world_size``-th from ``r``.

    Args:
        dataset: The training split.
        seed: Seed of the permutations and sample seeds.
        rank: This process's rank.
        world_size: Ranks sharing the data.
    """

    def __init__(self, dataset: Any, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0  # samples of this epoch already served (set when resuming mid-epoch)

    def keys(self) -> tuple[Tensor, Tensor]:
        """This rank's indices and sample seeds for the current epoch, each ``(num_samples,)``."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=g)
        seeds = torch.randint(2**62, (n,), generator=g)
        if self.total_size > n:  # pad as DistributedSampler does
            reps = math.ceil(self.total_size / n)
            order, seeds = order.repeat(reps)[: self.total_size], seeds.repeat(reps)[: self.total_size]
        sl = slice(self.rank, self.total_size, self.num_replicas)
        return order[sl], seeds[sl]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        order, seeds = self.keys()
        start, self.start = self.start, 0
        return iter(zip(order[start:].tolist(), seeds[start:].tolist()))

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over an ``EpochSampler`` that Lightning can stop and resume mid-epoch.

    ``state_dict`` (taken when a checkpoint is written) holds the epoch and the batches served in
    it; after ``load_state_dict`` the next iteration starts at the batch after those.

    Args:
        dataset: The training split; its items take ``(index, sample_seed)`` keys.
        batch_size: Samples per batch (per rank).
        seed: Seed of the order and augmentation.
        rank: This process's rank.
        world_size: Ranks sharing the data.
        **kwargs: Other ``DataLoader`` arguments (workers, pinning).
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        self.seed = seed
        super().__init__(dataset, batch_size=batch_size,
                         sampler=EpochSampler(dataset, seed, rank=rank, world_size=world_size), **kwargs)
        self.served = 0  # batches of the current epoch handed out

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        self.served = sampler.start // self.batch_size  # type: ignore[operator]
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self.served), "seed": int(self.seed)}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_order_seed(state, self.seed)
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        start = int(state["batches"]) * int(self.batch_size)  # type: ignore[arg-type]
        if start >= sampler.num_samples:  # saved after the epoch's last batch: the next epoch starts afresh
            start = 0
        sampler.set_epoch(int(state["epoch"]))
        sampler.start = start
        self.served = start // int(self.batch_size)  # type: ignore[arg-type]
