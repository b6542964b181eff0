"""Same-class partners (kd.data.pairs, for CS-KD): of the sample's class, uniform over it, drawn again
exactly from the same keys, on the DataLoader path and the fast path alike."""

from __future__ import annotations

import torch

from kd.data.fast import BatchLoader
from kd.data.order import ResumableLoader
from kd.data.pairs import ClassPairs
from kd.data.views import ImageViews, PadCrop


def _views(n: int = 60) -> ImageViews:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageViews(images, torch.arange(n) % 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), PadCrop(2, flip=True))


def test_a_partner_is_of_the_same_class_and_drawn_uniformly_over_it() -> None:
    pairs = ClassPairs(_views(60))  # 4 classes of 15
    g = torch.Generator().manual_seed(1)
    index = torch.arange(60).repeat(200)  # (12000,)
    j = pairs.partners(index, g)
    assert torch.equal(pairs.targets[j], pairs.targets[index])
    counts = torch.bincount(j, minlength=60).double()  # 200 draws per sample, 15 candidates: 200 each
    assert counts.min() > 120 and counts.max() < 290 and counts.sum() == 12000
    assert (j == index).any()  # the sample itself is a candidate, as in the authors' sampler


def test_an_item_carries_its_partner_drawn_from_the_sample_seed() -> None:
    base = _views()
    pairs = ClassPairs(base)
    a, b = pairs[(7, 123)], pairs[(7, 123)]
    assert torch.equal(a["pair_input"], b["pair_input"]) and a["pair_index"] == b["pair_index"]
    assert base.targets[a["pair_index"]] == base.targets[7] and torch.equal(a["input"], base[(7, 123)]["input"])
    others = {pairs[(7, s)]["pair_index"] for s in range(40)}
    assert len(others) > 5  # other seeds, other partners


def test_the_fast_path_renders_the_partners_and_a_resumed_epoch_draws_them_again() -> None:
    base = _views()
    loader = BatchLoader(ClassPairs(base), 16, shuffle=True, seed=5)
    whole = list(loader)
    for batch in whole:
        assert torch.equal(base.targets[batch["pair_index"]], batch["target"])
        assert batch["pair_input"].shape == batch["input"].shape
    resumed = BatchLoader(ClassPairs(base), 16, shuffle=True, seed=5)
    resumed.load_state_dict({"epoch": 0, "batches": 2, "seed": 5})
    for mine, theirs in zip(list(resumed), whole[2:], strict=True):
        assert torch.equal(mine["pair_index"], theirs["pair_index"]) and torch.equal(mine["pair_input"], theirs["pair_input"])


def test_the_dataloader_path_resumed_mid_epoch_draws_the_same_partners() -> None:
    pairs = ClassPairs(_views())
    whole = list(ResumableLoader(pairs, 16, seed=5))
    resumed = ResumableLoader(pairs, 16, seed=5)
    resumed.load_state_dict({"epoch": 0, "batches": 1, "seed": 5})
    for mine, theirs in zip(list(resumed), whole[1:], strict=True):
        assert torch.equal(mine["pair_index"], theirs["pair_index"]) and torch.equal(mine["pair_input"], theirs["pair_input"])
