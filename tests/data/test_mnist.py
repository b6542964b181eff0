"""MNIST from idx files the test writes in torchvision's layout: splits, shapes, jitter, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd.data.mnist import MEAN, STD, MNISTDataModule
from kd.errors import ConfigError
from kd.training.run import run
from tests.datagen import write_mnist


def test_splits_shapes_and_a_val_split_fixed_by_its_seed(tmp_path: Path) -> None:
    root = write_mnist(tmp_path)
    dm = MNISTDataModule(root=str(root), batch_size=16, val_size=40)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [160, 40, 50]
    train, val = set(dm.split_indices["train"]), set(dm.split_indices["val"])
    assert not train & val and len(train | val) == 200
    assert np.bincount(dm.splits["val"].targets.numpy()).tolist() == [4] * 10  # stratified
    again = MNISTDataModule(root=str(root), val_size=40)
    again.setup()
    assert np.array_equal(again.split_indices["val"], dm.split_indices["val"])
    other = MNISTDataModule(root=str(root), val_size=40, split_seed=1)
    other.setup()
    assert not np.array_equal(other.split_indices["val"], dm.split_indices["val"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (16, 1, 28, 28) and batch["input"].dtype == torch.float32
    assert batch["target"].dtype == torch.int64 and 0 <= batch["target"].min() and batch["target"].max() <= 9
    assert torch.equal(dm.train_targets()[batch["index"]], batch["target"])
    assert dm.splits["train"].images.dtype == torch.uint8  # held in memory as uint8


def test_jitter_shifts_training_images_only_by_at_most_its_pixels(tmp_path: Path) -> None:
    dm = MNISTDataModule(root=str(write_mnist(tmp_path)), val_size=40, jitter=2)
    dm.setup()
    raw = dm.splits["train"].images[0, 0].float() / 255.0
    plain = (raw - MEAN) / STD
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        x = dm.splits["train"][0]["input"][0]  # (28, 28)
        shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                  if torch.allclose(x[2:-2, 2:-2], plain[2 - dy : 26 - dy, 2 - dx : 26 - dx])]
        assert shifts, "not a shift of at most 2 px"
        seen.add(shifts[0])
    assert len(seen) > 5  # random offsets
    val0 = dm.splits["val"][0]["input"]
    assert torch.equal(val0, dm.splits["val"][0]["input"])  # no augmentation outside training
    test0 = dm.splits["test"][0]["input"][0]
    assert torch.allclose(test0, (dm.splits["test"].images[0, 0].float() / 255.0 - MEAN) / STD)


def test_missing_data_fails_with_the_path_and_how_to_get_it(tmp_path: Path) -> None:
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^data.root: MNIST not found: expected .* in .*nowhere/MNIST/raw; set data.download=true"):
        dm.setup()
    with pytest.raises(ConfigError, match="val_size"):
        MNISTDataModule(root=str(write_mnist(tmp_path)), val_size=500).setup()


def test_a_run_on_mnist_files(make_cfg, tmp_path: Path) -> None:
    root = write_mnist(tmp_path / "data")
    results = run(make_cfg("data=mnist", f"data.root={root}", "data.val_size=40", "distill=crd",
                           "model/teacher=hinton_mlp", "model/student=hinton_mlp_30", "distill.nce_k=64"))
    assert results["status"] == "completed" and results["data"]["input_shape"] == [1, 28, 28]
    assert results["student"]["params"] == 784 * 30 + 30 + 30 * 30 + 30 + 30 * 10 + 10


def test_the_hinton_table_is_one_sweep_with_test_error_counts(cli, tmp_path: Path) -> None:
    import json

    root = write_mnist(tmp_path / "data")
    sweep = tmp_path / "sweep"
    code = cli("-m", "experiment=hinton_mnist", f"data.root={root}", "data.val_size=40", "debug=fdr",
               f"hydra.sweep.dir={sweep}")
    assert code == 0
    runs = [json.loads(f.read_text()) for f in sorted(sweep.glob("*/results.json"))]
    rows = {tuple(o for o in r["overrides"] if o.startswith("hinton_row=")): r for r in runs}
    assert sorted(rows) == [(f"hinton_row={n}",) for n in ("small_t25", "small_t4", "student_hard", "student_soft", "teacher")]
    soft = rows[("hinton_row=student_soft",)]
    assert soft["config"]["distill"]["temperature"] == 20.0 and soft["student"]["params"] == 1_276_810
    assert rows[("hinton_row=teacher",)]["config"]["data"]["jitter"] == 2
    assert rows[("hinton_row=small_t25",)]["config"]["distill"]["temperature"] == 2.5
    for r in runs:
        m = r["student"]["metrics"]
        assert m["test/errors"] == round((1 - m["test/acc"]) * 50) and r["data"]["test_size"] == 50
