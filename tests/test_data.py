"""The digits datamodule: a stratified, seeded, disjoint split, standardised on train only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd.data import DigitsDataModule, stratified_split
from kd.errors import ConfigError


def _setup(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_split_sizes_cover_the_data_once() -> None:
    dm = _setup()
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == math.ceil(0.2 * 1797) and sizes["val"] == pytest.approx(0.15 * 1797, abs=1)
    # every sample of load_digits() lands in exactly one split
    idx = np.concatenate([dm.split_indices[s] for s in ("train", "val", "test")])
    assert np.array_equal(np.sort(idx), np.arange(1797))
    assert all(len(dm.split_indices[s]) == sizes[s] for s in sizes)


def test_split_is_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 50)  # 50 per class
    parts = stratified_split(labels, {"train": 0, "val": 0.2, "test": 0.2}, seed=0)
    for name, n in (("val", 10), ("test", 10), ("train", 30)):
        assert (np.bincount(labels[parts[name]], minlength=10) == n).all(), name
    again = stratified_split(labels, {"train": 0, "val": 0.2, "test": 0.2}, seed=0)
    other = stratified_split(labels, {"train": 0, "val": 0.2, "test": 0.2}, seed=1)
    assert all((parts[k] == again[k]).all() for k in parts)
    assert not (parts["val"] == other["val"]).all()


def test_standardised_with_training_statistics() -> None:
    dm = _setup()
    train = dm.splits["train"].inputs
    assert train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.std().item() == pytest.approx(1.0, abs=1e-5)
    assert dm.splits["test"].inputs.mean().abs().item() < 0.1  # same transform, not refitted


def test_batches_are_dicts_with_indices() -> None:
    dm = _setup(batch_size=16)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (16, 1, 8, 8) and batch["input"].dtype == torch.float32
    assert batch["target"].dtype == torch.long and batch["target"].max() < 10
    ds = dm.splits["train"]
    for i, j in zip(batch["index"].tolist(), range(16)):
        assert torch.equal(ds.inputs[i], batch["input"][j]) and ds.targets[i] == batch["target"][j]
    val = next(iter(dm.val_dataloader()))
    assert len(val["target"]) == min(64, len(dm.splits["val"]))  # eval batch 4x train batch


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"val_fraction": 0.0}, "val_fraction"), ({"test_fraction": 1.0}, "test_fraction"),
     ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"), ({"batch_size": 0}, "batch_size")],
)
def test_bad_arguments(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        DigitsDataModule(**kwargs)
    assert err.value.key == key
