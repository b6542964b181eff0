"""ImageNet's ImageFolder layout, written by the test with small JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd.data.imagenet import ImageNetDataModule
from kd.errors import ConfigError
from kd.run import run
from tests.datagen import write_image_folder


def test_splits_shapes_and_train_only_augmentation(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imagenet")
    dm = ImageNetDataModule(root=str(root), num_classes=3, image_size=32, batch_size=4, val_per_class=2, num_workers=0)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    assert not set(dm.split_indices["train"]) & set(dm.split_indices["val"])
    assert np.bincount(dm.splits["val"].targets.numpy()).tolist() == [2, 2, 2]
    again = ImageNetDataModule(root=str(root), num_classes=3, image_size=32, val_per_class=2)
    again.setup()
    assert np.array_equal(again.split_indices["val"], dm.split_indices["val"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 3, 32, 32) and batch["input"].dtype == torch.float32
    assert torch.equal(dm.train_targets()[batch["index"]], batch["target"])
    torch.manual_seed(0)
    train_views = {dm.splits["train"][0]["input"].sum().item() for _ in range(5)}
    assert len(train_views) > 1  # random resized crops
    assert torch.equal(dm.splits["val"][0]["input"], dm.splits["val"][0]["input"])  # deterministic
    assert dm.splits["test"][0]["input"].shape == (3, 32, 32)


def test_missing_folders_and_wrong_class_counts_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.root: no .*nowhere/train: expected .*/train/<class>/<image>"):
        ImageNetDataModule(root=str(tmp_path / "nowhere"), num_workers=0).setup()
    root = write_image_folder(tmp_path / "imagenet")
    with pytest.raises(ConfigError, match=r"^data.num_classes: is 1000 but .* has 3 class folders"):
        ImageNetDataModule(root=str(root), num_workers=0).setup()


def test_a_run_on_an_image_folder(make_cfg, tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imagenet")
    results = run(make_cfg("data=imagenet", f"data.root={root}", "data.num_classes=3", "data.image_size=32",
                           "data.batch_size=4", "data.val_per_class=2", "data.num_workers=0", "experiment=digits_resnet"))
    assert results["status"] == "completed" and results["data"]["input_shape"] == [3, 32, 32]
