"""The train / val / test loaders every kd datamodule shares, over its ``splits`` datasets."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kd.data.fast import BatchLoader
from kd.data.order import ResumableLoader
from kd.data.pairs import ClassPairs
from kd.data.strong import StrongViews
from kd.data.tensor import stratified_split
from kd.errors import ConfigError


class SplitDataModule(L.LightningDataModule):
    """Serves ``self.splits["train" | "val" | "test"]`` (built in ``setup``) as dict batches.

    Subclasses set ``batch_size``, ``eval_batch_size`` and ``num_workers`` and fill ``splits``
    with datasets that have a ``targets`` tensor in index order (for ``train_targets``).
    Batches bound for a GPU are collated into pinned memory: CUDA makes the host wait for the
    stream before an asynchronous copy from pageable memory (its documented API sync behaviour),
    which would stall every step on the previous one.
    """

    provides_index = True  # batch["index"]: position in the training split
    fast = False  # kd.data.fast.BatchLoader instead of a DataLoader
    class_pairs = False  # training batches carry a same-class partner of each sample (kd.data.pairs, CS-KD)
    strong_views = False  # training batches carry a strongly augmented second view (kd.data.strong, MLKD)
    batch_size: int
    eval_batch_size: int
    num_workers: int

    def carve_val(self, labels: np.ndarray, val_size: int, seed: int) -> dict[str, np.ndarray]:
        """Indices of a stratified split of ``val_size`` validation samples and the rest for training.

        ``val_size=0`` holds nothing out: every sample trains and ``val`` is empty; the datamodule
        then validates on its test split (the papers' protocol, ``protocol=paper``; see ``val_split``).

        Raises:
            ConfigError: If ``val_size`` leaves no training sample, or is negative.
        """
        if val_size == 0:
            return {"train": np.arange(len(labels)), "val": np.arange(0)}
        if not 0 < val_size < len(labels):
            raise ConfigError("data.val_size", f"must be in [0, {len(labels)}), got {val_size} (0: no validation "
                              "split, the test set is evaluated every epoch: protocol=paper)")
        return stratified_split(labels, {"train": 0.0, "val": val_size / len(labels)}, seed)

    @staticmethod
    def val_split(val: Any, test: Any, val_size: int) -> Any:
        """The dataset validation runs on: the held-out split, or the test split when ``val_size`` is 0
        (then "best validation" is the best test epoch, what the mdistiller lineage reports)."""
        return test if val_size == 0 else val

    def train_targets(self) -> Tensor:
        """Labels of the training split in the order of ``batch["index"]``, ``(N,)``."""
        self.setup("fit")
        return self.splits["train"].targets

    def _device(self) -> torch.device:
        """Where the fast path keeps the data: the trainer's GPU when there is one, else the CPU."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return device if device.type == "cuda" else torch.device("cpu")

    def _fast_loader(self, split: str, train: bool) -> BatchLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        device = self._device()
        moved: dict[tuple[str, str], Any] = self.__dict__.setdefault("_moved_splits", {})
        key = (split, str(device))
        if key not in moved:  # moved once, reused every epoch
            moved[key] = self.splits[split].to(device)
        data = self._with_extras(moved[key]) if train else moved[key]
        return BatchLoader(
            data, self.batch_size if train else self.eval_batch_size, shuffle=train,
            seed=torch.initial_seed() % 2**62, rank=rank, world_size=world,
        )

    def _with_extras(self, data: Any) -> Any:
        """The training split with what the method asked of its batches: partners, a strong view."""
        if self.class_pairs:
            data = ClassPairs(data)
        if self.strong_views:
            data = StrongViews(data)
        return data

    def _loader(self, split: str, train: bool) -> DataLoader | BatchLoader:
        if getattr(self, "fast", False):
            return self._fast_loader(split, train)
        common = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                  "pin_memory": self._device().type == "cuda"}
        if not train:
            return DataLoader(self.splits[split], batch_size=self.eval_batch_size, shuffle=False, **common)
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # order and augmentation drawn from (seed, epoch, position): exact when resumed mid-epoch
        data = self._with_extras(self.splits[split])
        return ResumableLoader(data, self.batch_size, seed=torch.initial_seed() % 2**62,
                               rank=rank, world_size=world, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
