"""ImageNet's ImageFolder layout and the official ILSVRC2012 archives, written by the tests with small JPEGs."""

from __future__ import annotations

import hashlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torchvision.datasets import ImageNet
from torchvision.datasets import imagenet as tv_imagenet

import kd.data.imagenet as kd_imagenet
from kd.data.imagenet import MEAN, STD, ImageNetDataModule
from kd.errors import ConfigError
from kd.run import run
from tests.datagen import write_image_folder, write_imagenet_archives

WNIDS = ["n10000000", "n10001111", "n10002222"]  # write_imagenet_archives' classes, in sorted order


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


def official_md5s(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks each archive against the official md5 sum: make the generated ones official."""
    meta = {key: (name, hashlib.md5((root / name).read_bytes()).hexdigest())
            for key, (name, _) in tv_imagenet.ARCHIVE_META.items()}
    monkeypatch.setattr(tv_imagenet, "ARCHIVE_META", meta)


@pytest.fixture
def archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A root holding only the three official archives (3 classes, 6 training and 2 val images each)."""
    root = write_imagenet_archives(tmp_path / "imagenet")
    official_md5s(root, monkeypatch)
    return root


def datamodule(root: Path) -> ImageNetDataModule:
    return ImageNetDataModule(root=str(root), num_classes=3, image_size=16, batch_size=4, val_per_class=2, num_workers=0)


def painted_class(images: Tensor, classes: int = 3) -> Tensor:
    """The class write_imagenet_archives painted each image with (its gray level), ``(B,)``."""
    pixels = images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)  # (B, 3, H, W) in [0, 1]
    return (pixels.mean(dim=(1, 2, 3)) * classes - 0.5).round().long()


def scratch_dirs(root: Path) -> list[Path]:
    return list(root.glob(".kd-extract-*"))


def test_official_archives_are_extracted_once_into_class_folders(archives: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = datamodule(archives)
    dm.prepare_data()
    assert sorted(p.name for p in (archives / "train").iterdir()) == WNIDS
    assert sorted(p.name for p in (archives / "val").iterdir()) == WNIDS
    assert (archives / "meta.bin").is_file() and not scratch_dirs(archives)
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [12, 6, 6]
    assert not set(dm.split_indices["train"]) & set(dm.split_indices["val"])
    assert np.bincount(dm.splits["val"].targets.numpy()).tolist() == [2, 2, 2]
    # the synsets' words from meta.bin, without the non-leaf synset "entity" of the devkit
    assert dm.class_names == ["object 0, thing 0", "object 1, thing 1", "object 2, thing 2"]
    # the classes and labels torchvision's own ImageNet reads from the same tree
    official = ImageNet(str(archives), split="val")
    assert official.wnids == dm.splits["test"].folder.classes == WNIDS
    assert official.targets == dm.splits["test"].targets.tolist()
    # labels agree with the devkit's ground truth, which the generator painted into the pixels
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        for batch in loader:
            assert batch["input"].shape[1:] == (3, 16, 16) and batch["input"].dtype == torch.float32
            assert torch.equal(painted_class(batch["input"]), batch["target"])
            assert torch.equal(dm.splits[split].targets[batch["index"]], batch["target"])
    assert torch.equal(dm.train_targets(), dm.splits["train"].targets)

    # a second datamodule (a second run) reads the folders: no extraction, the same split
    def no_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("extracted again")

    monkeypatch.setattr(kd_imagenet, "ImageNet", no_extraction)
    built = {p: p.stat().st_mtime_ns for p in (archives / "train", archives / "val", archives / "meta.bin")}
    again = datamodule(archives)
    again.prepare_data()
    again.setup()
    assert np.array_equal(again.split_indices["val"], dm.split_indices["val"])
    assert {p: p.stat().st_mtime_ns for p in built} == built


def test_setup_alone_extracts_and_concurrent_callers_extract_once(archives: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def slow_imagenet(root: str, split: str) -> ImageNet:
        calls.append(split)
        time.sleep(0.2)  # the others reach the lock meanwhile
        return ImageNet(root, split=split)

    monkeypatch.setattr(kd_imagenet, "ImageNet", slow_imagenet)
    dms = [datamodule(archives) for _ in range(3)]
    with ThreadPoolExecutor(len(dms)) as pool:
        for future in [pool.submit(dm.setup, "fit") for dm in dms]:
            future.result()
    assert calls == ["train", "val"]
    assert all(np.array_equal(dm.split_indices["val"], dms[0].split_indices["val"]) for dm in dms)
    assert [len(dm.splits["test"]) for dm in dms] == [6, 6, 6] and not scratch_dirs(archives)


@pytest.mark.parametrize("crash_in", ["ILSVRC2012_img_train.tar", "n10001111.tar", "ILSVRC2012_img_val.tar"])
def test_a_crash_mid_extraction_leaves_no_tree_taken_for_complete(
    archives: Path, monkeypatch: pytest.MonkeyPatch, crash_in: str
) -> None:
    real_extract = tv_imagenet.extract_archive

    def crashing_extract(from_path: str, to_path: str | None = None, remove_finished: bool = False) -> str:
        if Path(from_path).name == crash_in:
            raise OSError("No space left on device")
        return real_extract(from_path, to_path, remove_finished)

    monkeypatch.setattr(tv_imagenet, "extract_archive", crashing_extract)
    with pytest.raises(OSError, match="No space left"):
        datamodule(archives).setup()
    assert not scratch_dirs(archives) and not (archives / "val").exists()
    train_done = crash_in == "ILSVRC2012_img_val.tar"  # train was complete before val crashed: kept
    assert (archives / "train").is_dir() == train_done and (archives / "meta.bin").is_file() == train_done
    if train_done:
        assert sorted(p.name for p in (archives / "train").iterdir()) == WNIDS
        kept = (archives / "train").stat().st_mtime_ns
    # a process killed outright leaves its scratch directory behind: the next extraction removes it
    (archives / ".kd-extract-killed" / "train" / WNIDS[0]).mkdir(parents=True)

    monkeypatch.setattr(tv_imagenet, "extract_archive", real_extract)
    dm = datamodule(archives)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [12, 6, 6] and not scratch_dirs(archives)
    if train_done:
        assert (archives / "train").stat().st_mtime_ns == kept


def test_missing_archives_are_named_with_where_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as error:
        datamodule(nowhere).setup()
    assert str(error.value) == (
        f"data.root: no {nowhere}/train: expected {nowhere}/train/<class>/<image> and {nowhere}/val/<class>/<image>, "
        f"or the official ImageNet archives to extract them from, missing: {nowhere}/ILSVRC2012_devkit_t12.tar.gz, "
        f"{nowhere}/ILSVRC2012_img_train.tar, {nowhere}/ILSVRC2012_img_val.tar "
        "(download them from https://image-net.org/challenges/LSVRC/2012/2012-downloads.php; "
        "kd extracts them once with torchvision.datasets.ImageNet)"
    )
    root = write_imagenet_archives(tmp_path / "imagenet")
    (root / "ILSVRC2012_img_val.tar").unlink()
    only_val = r"missing: [^ ]*/imagenet/ILSVRC2012_img_val.tar \(download them from https://image-net.org/"
    with pytest.raises(ConfigError, match=only_val):
        datamodule(root).prepare_data()
    assert sorted(p.name for p in root.iterdir()) == ["ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar"]
    # train already sorted into folders: only val is needed, which takes the devkit and the val archive
    folders = write_image_folder(tmp_path / "folders")
    shutil.rmtree(folders / "val")
    devkit_and_val = r"no .*/folders/val: .* missing: [^ ]*/ILSVRC2012_devkit_t12.tar.gz, [^ ]*/ILSVRC2012_img_val.tar \("
    with pytest.raises(ConfigError, match=devkit_and_val):
        datamodule(folders).setup()


def test_an_archive_that_is_not_the_official_one_fails_clearly(tmp_path: Path) -> None:
    root = write_imagenet_archives(tmp_path / "imagenet")  # md5 sums other than the official ones
    corrupted = (r"^data.root: cannot extract the ImageNet archives in .*imagenet: The archive ILSVRC2012_devkit_t12.tar.gz "
                 r"is not present in the root directory or is corrupted.* \(download it again from https://image-net.org/")
    with pytest.raises(ConfigError, match=corrupted):
        datamodule(root).setup()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    assert not scratch_dirs(root)


def test_class_names_are_the_folder_names_without_meta_bin(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imagenet")
    dm = datamodule(root)
    dm.prepare_data()
    dm.setup()
    assert dm.class_names == ["n00000000", "n00000001", "n00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]  # nothing written: root may be read-only


@pytest.mark.slow
def test_a_run_on_the_official_archives(make_cfg, archives: Path) -> None:
    results = run(make_cfg("data=imagenet", f"data.root={archives}", "data.num_classes=3", "data.image_size=32",
                           "data.batch_size=4", "data.val_per_class=2", "data.num_workers=0", "experiment=digits_resnet"))
    assert results["status"] == "completed" and results["data"]["test_size"] == 6
    assert (archives / "train").is_dir() and (archives / "val").is_dir()
