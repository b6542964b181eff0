"""ImageNet's ImageFolder layout and the official ILSVRC2012 archives, written by the tests with small JPEGs."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torchvision.datasets import ImageFolder, ImageNet
from torchvision.datasets import imagenet as tv_imagenet
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F

import kd.data.imagenet as kd_imagenet
from kd.data.imagenet import MEAN, STD, CropViews, ImageNetDataModule, IndexedImages, crop_seed
from kd.errors import ConfigError, instantiate_checked
from kd.training.run import run
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


def test_a_run_on_pre_drawn_crops_caches_the_teachers_top_k(make_cfg, tmp_path: Path) -> None:
    """FKD end to end: data.views makes ImageNet's crops a finite set, so the teacher's top-k is stored once."""
    root = write_image_folder(tmp_path / "imagenet")
    base = ("data=imagenet", f"data.root={root}", "data.num_classes=3", "data.image_size=32", "data.batch_size=4",
            "data.val_per_class=2", "data.num_workers=0", "experiment=digits_resnet", "teacher_cache.enabled=true",
            "report.enabled=false")
    with pytest.raises(ConfigError, match=r"^teacher_cache.enabled: .* RandomResizedCrop .* data.views=E"):
        run(make_cfg(*base))
    results = run(make_cfg(*base, "data.views=2", "data.views_seed=5", "teacher_cache.top_k=2", run_dir="fkd"))
    assert results["status"] == "completed"
    (meta_file,) = (tmp_path / "outputs" / "teacher_cache").glob("*/meta.json")
    meta = json.loads(meta_file.read_text())
    train = len(ImageFolder(str(root / "train"))) - 3 * 2  # val_per_class images of each class held out
    assert (meta["top_k"], meta["num_views"], meta["num_samples"], meta["teacher_forwards"]) == (2, 2, train, 2 * train)
    assert meta["key"]["data"]["spec"]["seed"] == 5 and meta["key"]["data"]["spec"]["num_views"] == 2
    assert 0 <= meta["tail_mass"]["mean"] <= meta["tail_mass"]["max"] <= 1  # this one-step teacher is all but certain


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


# FKD-style pre-drawn crops (data.views): kd.data.imagenet.CropViews

def crop_views(root: Path, views: int = 4, seed: int = 0, size: int = 24) -> CropViews:
    """The views of every image of ``<root>/train``, in ImageFolder order."""
    folder = ImageFolder(str(root / "train"))
    return CropViews(folder, np.arange(len(folder)), size, views, seed)


def by_hand(cv: CropViews, i: int, view: int) -> Tensor:
    """View ``view`` of image ``i`` made with torchvision's functional API from the PIL image and ``crop``."""
    pil = cv.folder.loader(cv.folder.samples[int(cv.indices[i])][0])
    top, left, h, w, flipped = cv.crop(i, view, *pil.size)
    x = F.resized_crop(F.to_image(pil), top, left, h, w, [cv.image_size] * 2, InterpolationMode.BILINEAR, antialias=True)
    x = F.horizontal_flip(x) if flipped else x
    return F.normalize(F.to_dtype(x, torch.float32, scale=True), MEAN, STD).as_subclass(Tensor)


def test_crop_views_render_what_torchvision_makes_of_the_drawn_crops(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imagenet")
    dm = ImageNetDataModule(root=str(root), num_classes=3, image_size=24, batch_size=4, val_per_class=2, num_workers=0,
                            views=5, views_seed=7)
    dm.setup()
    cv = dm.splits["train"]
    assert isinstance(cv, CropViews) and len(cv) == 12 and cv.num_views == 5
    assert torch.equal(cv.targets, torch.as_tensor(np.asarray(cv.folder.targets)[dm.split_indices["train"]]))
    sizes = [cv.folder.loader(cv.folder.samples[int(k)][0]).size for k in cv.indices]
    assert sum(w != h for w, h in sizes) >= 10  # non-square images: rows and columns are not interchangeable

    index = torch.tensor([0, 0, 0, 0, 0, 5, 11, 3, 5])
    views = torch.tensor([0, 1, 2, 3, 4, 1, 4, 2, 1])  # (5, 1) twice: the same input twice
    x = cv.render(index, views)  # (B, 3, S, S)
    assert x.shape == (9, 3, 24, 24) and x.dtype == torch.float32
    for b, (i, v) in enumerate(zip(index.tolist(), views.tolist())):
        assert torch.equal(x[b], by_hand(cv, i, v)), (i, v)
        # the module's own random training transform, its RNG seeded as the view's generator is
        torch.manual_seed(crop_seed(7, i, v))
        assert torch.equal(x[b], dm.train_transform(F.pil_to_tensor(cv.folder.loader(cv.folder.samples[int(cv.indices[i])][0]))))
    flips = {cv.crop(i, v, *sizes[i])[4] for i, v in zip(index.tolist(), views.tolist())}
    assert flips == {False, True}

    # the DataLoader path: __getitem__ draws the view from the global RNG and renders the same numbers
    torch.manual_seed(0)
    items = [cv[i] for i in (0, 5, 11) for _ in range(12)]
    assert {item["view"] for item in items} == set(range(5))
    for item in items[::5]:
        assert torch.equal(item["input"], by_hand(cv, item["index"], item["view"]))
        assert item["target"] == int(cv.targets[item["index"]])
    batch = next(iter(dm.train_dataloader()))
    assert torch.equal(batch["input"], cv.render(batch["index"], batch["view"]))
    assert torch.equal(batch["target"], cv.targets[batch["index"]])
    assert cv.draw_views(1000, torch.Generator().manual_seed(0)).unique().tolist() == list(range(5))


def test_crop_views_are_fixed_by_seed_image_and_view(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imagenet")
    cv = crop_views(root, views=6, seed=1)
    pairs = [(i, v) for i in range(len(cv)) for v in range(6)]
    crops = [cv.crop(i, v, 300, 200) for i, v in pairs]
    before = torch.get_rng_state()
    index, views = torch.tensor([0, 0, 0, 0, 0, 0, 7]), torch.tensor([0, 1, 2, 3, 4, 5, 2])
    x = cv.render(index, views)
    assert torch.equal(torch.get_rng_state(), before)  # Lightning's seeding of the global RNG is left alone

    for again in (crop_views(root, views=6, seed=1), pickle.loads(pickle.dumps(cv))):
        assert [again.crop(i, v, 300, 200) for i, v in pairs] == crops
        assert torch.equal(again.render(index, views), x)
    assert len(set(crops)) == len(crops)  # every view of every image is a crop of its own
    assert all(not torch.equal(x[a], x[b]) for a in range(6) for b in range(a))
    other = crop_views(root, views=6, seed=2)
    assert sum(other.crop(i, v, 300, 200) == c for (i, v), c in zip(pairs, crops)) == 0
    assert not torch.equal(other.render(index, views), x)
    spec = cv.spec()
    assert json.loads(json.dumps(spec)) == spec and other.spec() != spec
    assert {k: spec[k] for k in ("kind", "size", "scale", "ratio", "flip", "seed", "num_views")} == {
        "kind": "random_resized_crop", "size": 24, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True, "seed": 1,
        "num_views": 6}


def test_crop_views_are_distributed_as_random_resized_crop_and_flip(tmp_path: Path) -> None:
    cv = crop_views(write_image_folder(tmp_path / "imagenet", classes=2, per_class=1), views=8, seed=3)
    # common photo shapes, one so wide that most of the ten attempts fail, and one so narrow that
    # all do: its fallback (the full width, as tall as the ratio range allows) is below the scale range
    shapes = [(500, 375), (375, 500), (224, 224), (1000, 100), (40, 800)]
    n = 4000
    size_of = [shapes[k] for k in np.random.default_rng(0).integers(len(shapes), size=n)]
    crops = [cv.crop(k // 8, k % 8, *size_of[k]) for k in range(n)]

    def fallback(width: int, height: int) -> tuple[int, int, int, int]:
        if width / height < 3 / 4:
            w, h = width, round(width / (3 / 4))
        elif width / height > 4 / 3:
            w, h = round(height * 4 / 3), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def in_range(width: int, height: int, h: int, w: int) -> bool:
        # w and h are rounded from sqrt(area * r) and sqrt(area / r): each within 0.5 of its real value
        area = width * height
        return ((w + 0.5) * (h + 0.5) >= 0.08 * area and (w - 0.5) * (h - 0.5) <= area
                and (w + 0.5) / (h - 0.5) >= 0.75 and (w - 0.5) / (h + 0.5) <= 4 / 3)

    fallbacks = {s: 0 for s in shapes}
    for (width, height), (top, left, h, w, _) in zip(size_of, crops):
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        assert in_range(width, height, h, w) or (top, left, h, w) == fallback(width, height), ((width, height), (top, left, h, w))
        fallbacks[(width, height)] += (top, left, h, w) == fallback(width, height) and not in_range(width, height, h, w)
    assert fallbacks[(40, 800)] == size_of.count((40, 800)) > 0 and fallbacks[(500, 375)] == 0

    flips = sum(c[4] for c in crops)
    assert abs(flips - n / 2) < 5 * math.sqrt(n) / 2  # 5 binomial standard deviations

    # torchvision's own sampler, over as many draws on the same shapes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = [RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                     for w, h in size_of]
        # and the exact numbers: the global RNG seeded as each view's generator draws the same crop and flip
        for k in range(0, n, 13):
            torch.manual_seed(crop_seed(3, k // 8, k % 8))
            width, height = size_of[k]
            drawn = RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
            assert crops[k] == (*drawn, bool(torch.rand(1) < 0.5))

    def area_and_log_ratio(params: list, sizes: list) -> tuple[float, float]:
        area = np.mean([h * w / (width * height) for (_, _, h, w, *_), (width, height) in zip(params, sizes)])
        return float(area), float(np.mean([math.log(w / h) for _, _, h, w, *_ in params]))

    ours, theirs = area_and_log_ratio(crops, size_of), area_and_log_ratio(reference, size_of)
    assert abs(ours[0] - theirs[0]) < 0.03  # the standard error of the difference is ~0.006
    assert abs(ours[1] - theirs[1]) < 0.03  # ~0.005


def test_content_digest_follows_paths_sizes_and_labels(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imagenet")
    digest = crop_views(root).content_digest()
    assert len(digest) == 64 and crop_views(root, views=2, seed=5).content_digest() == digest
    os.utime(root / "train" / "n00000000" / "0.JPEG", ns=(0, 0))  # touched, not changed
    assert crop_views(root).content_digest() == digest
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "imagenet")  # paths relative to the folder
    assert crop_views(moved).content_digest() == digest
    cv = crop_views(root)
    assert CropViews(cv.folder, cv.indices[:-1], 24, 4, 0).content_digest() != digest

    last = root / "train" / "n00000000" / "5.JPEG"
    last.rename(last.with_name("9.JPEG"))  # still last in its class: only the name differs
    assert crop_views(root).content_digest() != digest
    last.with_name("9.JPEG").rename(last)
    assert crop_views(root).content_digest() == digest
    with open(root / "train" / "n00000001" / "0.JPEG", "ab") as f:
        f.write(b"\0")
    assert crop_views(root).content_digest() != digest
    shutil.move(moved / "train" / "n00000002" / "5.JPEG", moved / "train" / "n00000001" / "5b.JPEG")  # relabelled
    assert crop_views(moved).content_digest() != digest


def test_views_are_checked_and_null_keeps_the_random_transform(make_cfg, tmp_path: Path) -> None:
    for bad in (0, -1):
        with pytest.raises(ConfigError) as error:
            instantiate_checked(make_cfg("data=imagenet", f"data.views={bad}").data, "data")
        assert str(error.value) == (f"data.views: must be an integer >= 1 (crops pre-drawn per training image), "
                                    f"or null for fresh random crops, got {bad}")
    with pytest.raises(ConfigError, match=r"^data.views_seed: must be an integer >= 0, got -1$"):
        instantiate_checked(make_cfg("data=imagenet", "data.views=2", "data.views_seed=-1").data, "data")

    root = write_image_folder(tmp_path / "imagenet")
    dm = instantiate_checked(make_cfg("data=imagenet", f"data.root={root}", "data.num_classes=3", "data.val_per_class=2",
                                      "data.image_size=16").data, "data")
    dm.setup()
    assert dm.views is None and type(dm.splits["train"]) is IndexedImages
    assert dm.splits["train"].transform is dm.train_transform
    fkd = datamodule(root)
    fkd.views = 3
    fkd.setup()
    assert type(fkd.splits["train"]) is CropViews and fkd.splits["train"].num_views == 3
    assert all(type(fkd.splits[s]) is IndexedImages and fkd.splits[s].transform is fkd.eval_transform for s in ("val", "test"))
    assert np.array_equal(fkd.splits["train"].indices, dm.split_indices["train"])
