"""Training batches that pair each sample with another of its class, for class-wise self-distillation.

CS-KD (Yun et al., CVPR 2020, arXiv:2003.13964; ``kd.losses.cskd``) matches the student's prediction
on a sample to its own prediction on another sample of the same class. The authors'
``PairBatchSampler`` appends to each batch, for every sample, one drawn uniformly from the training
samples of its class (the sample itself among them). ``ClassPairs`` does the same as a dataset
wrapper: an item ``(index, sample_seed)`` carries ``pair_input`` (and ``pair_index``), the partner and
its augmentation drawn from that sample's seed; a fast-path batch draws its partners from a seed made
of the batch's indices and views. Either way the partners are a function of (seed, epoch, position),
as the rest of the data order (``kd.data.order``), so a run resumed mid-epoch draws them again exactly.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import torch
from torch import Tensor

from kd.data.order import Key, sample_generator, split_key
from kd.data.views import WrappedSplit, to_device

PAIR_SALT = 0x5CD5  # keeps the partner's draws apart from the sample's own augmentation draws


class ClassPairs(WrappedSplit):
    """The training split, each item or batch with a partner of the same class.

    Args:
        base: The split: ``targets`` ``(N,)`` and items of ``(index, sample_seed)`` keys (the
            DataLoader path); ``batch``/``render``/``draw_views``/``num_views`` for the fast path.
    """

    def __init__(self, base: Any) -> None:
        super().__init__(base)
        targets = torch.as_tensor(base.targets, dtype=torch.long).cpu()
        counts = torch.bincount(targets)
        order = torch.argsort(targets, stable=True)  # members of class c: order[starts[c] : starts[c] + counts[c]]
        self._order, self._counts = order, counts
        self._starts = torch.cumsum(counts, 0) - counts
        self._cpu_targets = targets

    def to(self, device: torch.device | str) -> ClassPairs:
        """The same pairs over the split moved to ``device``; the class tables stay on the host, where
        ``partners`` draws (nothing is read back from the device to rebuild them)."""
        moved = copy.copy(self)
        moved.base = self.base.to(device)
        moved.targets = moved.base.targets
        return moved

    def partners(self, index: Tensor, generator: torch.Generator | None) -> Tensor:
        """For each sample of ``index`` ``(B,)``, one training sample of its class, uniformly (``(B,)``, CPU)."""
        y = self._cpu_targets[index.cpu()]  # (B,)
        pick = (torch.rand(len(y), generator=generator, dtype=torch.float64) * self._counts[y]).long()  # (B,)
        return self._order[self._starts[y] + pick]

    def __getitem__(self, key: Key) -> dict[str, Any]:
        i, seed = split_key(key)
        item = dict(self.base[key])
        g = sample_generator(None if seed is None else seed ^ PAIR_SALT)
        j = int(self.partners(torch.tensor([i]), g)[0])
        if seed is None:
            item["pair_input"] = self.base[j]["input"]
        else:
            item["pair_input"] = self.base[(j, int(torch.randint(2**62, (), generator=g)))]["input"]
        item["pair_index"] = j
        return item

    def batch(self, index: Tensor, views: Tensor) -> dict[str, Tensor]:
        """``base.batch`` plus the partners' inputs, rendered in one call."""
        out = self.base.batch(index, views)
        digest = hashlib.blake2b(torch.stack([index.cpu().long(), views.cpu().long()]).numpy().tobytes(), digest_size=8)
        g = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") % 2**62 ^ PAIR_SALT)
        j = self.partners(index, g)  # (B,)
        pair_views = self.base.draw_views(len(j), g) if self.num_views > 1 else torch.zeros(len(j), dtype=torch.long)
        device = out["input"].device
        out["pair_index"] = to_device(j, device)
        out["pair_input"] = self.base.render(out["pair_index"], to_device(pair_views, device))
        return out
