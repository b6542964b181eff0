"""CIFAR-10/100 from python pickles the test writes in torchvision's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd.data.cifar import STATS, CIFARDataModule
from kd.errors import ConfigError
from kd.training.run import run
from tests.datagen import write_cifar


@pytest.mark.parametrize(("dataset", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_splits_shapes_labels_and_a_fixed_val_split(tmp_path: Path, dataset: str, classes: int) -> None:
    n_train = 300 if classes == 10 else 400
    root = write_cifar(tmp_path, dataset, n_train=n_train)
    dm = CIFARDataModule(root=str(root), dataset=dataset, batch_size=16, val_size=classes * 2 if classes == 100 else 50)
    dm.setup("fit")
    val_size = len(dm.splits["val"])
    assert len(dm.splits["train"]) + val_size == n_train and len(dm.splits["test"]) == 60
    assert dm.num_classes == classes
    assert not set(dm.split_indices["train"]) & set(dm.split_indices["val"])
    assert np.bincount(dm.splits["val"].targets.numpy(), minlength=classes).min() >= 1  # stratified
    again = CIFARDataModule(root=str(root), dataset=dataset, val_size=dm.val_size)
    again.setup()
    assert np.array_equal(again.split_indices["val"], dm.split_indices["val"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (16, 3, 32, 32) and batch["input"].dtype == torch.float32
    assert batch["target"].max() < classes and torch.equal(dm.train_targets()[batch["index"]], batch["target"])
    assert dm.splits["train"].images.dtype == torch.uint8


def test_augmentation_is_pad_crop_flip_on_training_images_only(tmp_path: Path) -> None:
    dm = CIFARDataModule(root=str(write_cifar(tmp_path)), val_size=200)
    dm.setup()
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in STATS["cifar100"])
    raw = dm.splits["train"].images[0].float() / 255.0  # (3, 32, 32)
    torch.manual_seed(0)
    views = [dm.splits["train"][0]["input"] * std + mean for _ in range(30)]
    assert len({v.sum().item() for v in views}) > 5  # random views
    for v in views:  # each view is the image shifted by <= 4 px (zero fill), maybe flipped
        found = False
        for img in (raw, raw.flip(-1)):
            padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
            found |= any(torch.allclose(v, padded[:, dy : dy + 32, dx : dx + 32], atol=1e-5)
                         for dy in range(9) for dx in range(9))
        assert found
    val = dm.splits["val"]
    torch.testing.assert_close(val[0]["input"], (val.images[0].float() / 255.0 - mean) / std)  # no augmentation


def test_missing_data_and_bad_settings_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.root: cifar100 not found: expected .*nowhere/cifar-100-python; set data.download=true"):
        CIFARDataModule(root=str(tmp_path / "nowhere")).setup()
    with pytest.raises(ConfigError, match="^dataset: must be one of cifar10, cifar100"):
        CIFARDataModule(dataset="cifar1000")


def test_a_cifar_zoo_pair_distills_on_generated_cifar100(make_cfg, tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "data", n_train=400)
    results = run(make_cfg("data=cifar100", f"data.root={root}", "data.val_size=200", "distill=crd_kd",
                           "model/teacher=cifar_resnet56", "model/student=cifar_resnet20", "distill.methods.crd.nce_k=64"))
    assert results["status"] == "completed" and results["student"]["params"] == 278_324
