"""The fast data path: whole batches rendered from in-memory tensors, sharded like DistributedSampler."""

from __future__ import annotations

import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datagen import write_cifar
from torch.utils._python_dispatch import TorchDispatchMode

import kd.data.pairs
import kd.data.strong
import kd.data.views
from kd.data import CIFARDataModule, DigitsDataModule
from kd.data.fast import BatchLoader
from kd.data.pairs import ClassPairs
from kd.data.strong import StrongViews
from kd.data.views import ImageViews, PadCrop


def _views_dataset(n: int = 50) -> ImageViews:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageViews(images, torch.arange(n) % 5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), PadCrop(2, flip=True))


def test_ranks_split_one_permutation_like_distributed_sampler() -> None:
    data = _views_dataset(51)
    loaders = [BatchLoader(data, 8, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    epochs = [[list(iter(loader)) for loader in loaders] for _ in range(2)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4] == [len(loader) for loader in loaders]  # 26 per rank
        seen = [torch.cat([b["index"] for b in rank]) for rank in batches]
        assert all(len(s) == 26 for s in seen)
        union = torch.cat(seen)
        assert set(union.tolist()) == set(range(51)) and len(union) == 52  # one sample padded in
        # every batch is rendered from the view it names
        for rank in batches:
            for b in rank:
                torch.testing.assert_close(b["input"], data.render(b["index"], b["view"]))
                assert torch.equal(b["target"], data.targets[b["index"]])
                # a strided share would be staged in pageable memory on its way to a GPU
                assert b["index"].is_contiguous() and b["view"].is_contiguous()
    first, second = (torch.cat([b["index"] for b in e[0]]) for e in epochs)
    assert not torch.equal(first, second)  # a new permutation each epoch
    views = torch.cat([b["view"] for e in epochs for r in e for b in r])
    assert views.min() >= 0 and views.max() < data.num_views == 50 and len(views.unique()) > 35


def test_evaluation_batches_are_in_order_in_the_plain_view() -> None:
    data = _views_dataset(20)
    batches = list(BatchLoader(data, 6, shuffle=False))
    assert [len(b["index"]) for b in batches] == [6, 6, 6, 2]
    assert torch.equal(torch.cat([b["index"] for b in batches]), torch.arange(20))
    assert all(int(b["view"].max()) == 0 for b in batches)


def test_view_zero_of_pad_crop_is_the_corner_and_the_centre_view_is_the_image() -> None:
    pc = PadCrop(2, flip=True)
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4) + 1
    centre = (2 * 5 + 2) * 2  # top = left = padding, no flip
    assert torch.equal(pc.apply(img, torch.tensor([centre])), img)
    assert torch.equal(pc.apply(img, torch.tensor([centre + 1])), img.flip(-1))
    corner = pc.apply(img, torch.tensor([0]))  # shifted down and right by 2, zero fill
    assert torch.equal(corner[0, :, 2:, 2:], img[0, :, :2, :2]) and corner[0, :, :2].abs().sum() == 0
    images = torch.randint(0, 256, (pc.num_views, 2, 5, 7), dtype=torch.uint8)
    views = torch.arange(pc.num_views)
    batched = pc.apply(images, views)
    for v in range(pc.num_views):  # the DataLoader's one-image path renders the same view
        assert torch.equal(pc.apply_one(images[v], v), batched[v])
    with pytest.raises(ValueError, match="padding must be >= 0"):
        PadCrop(-1, flip=False)


def test_datamodules_serve_the_fast_path_with_the_same_batches_as_the_dataloader(tmp_path: Path) -> None:
    root = write_cifar(tmp_path, dataset="cifar10", n_train=40, n_test=20)
    fast = CIFARDataModule(root=str(root), dataset="cifar10", val_size=10, batch_size=8, fast=True)
    slow = CIFARDataModule(root=str(root), dataset="cifar10", val_size=10, batch_size=8)
    for dm in (fast, slow):
        dm.setup("fit")
    loader = fast.train_dataloader()
    assert isinstance(loader, BatchLoader) and len(loader) == 4
    batch = next(iter(loader))
    assert batch["input"].shape == (8, 3, 32, 32) and batch["input"].dtype == torch.float32
    # the DataLoader path renders the same (index, view) into the same input
    for k in range(8):
        i, v = int(batch["index"][k]), int(batch["view"][k])
        expect = slow.splits["train"].render(torch.tensor([i]), torch.tensor([v]))[0]
        torch.testing.assert_close(batch["input"][k], expect)
    items = [slow.splits["train"][3] for _ in range(40)]  # the DataLoader path draws views too
    assert len({item["view"] for item in items}) > 20
    for item in items[:10]:
        rendered = slow.splits["train"].render(torch.tensor([3]), torch.tensor([item["view"]]))[0]
        torch.testing.assert_close(item["input"], rendered)
    val = list(fast.val_dataloader())
    torch.testing.assert_close(torch.cat([b["input"] for b in val]), torch.stack([slow.splits["val"][i]["input"] for i in range(10)]))
    digits = DigitsDataModule(fast=True, batch_size=100)
    digits.setup("fit")
    d = next(iter(digits.train_dataloader()))
    assert d["input"].shape == (100, 1, 8, 8) and torch.equal(d["input"], digits.splits["train"].inputs[d["index"]])


class BlockingCopies(TorchDispatchMode):
    """Records every copy from host memory onto another device that the host would wait for."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else torch.device(kwargs.get("device") or src.device)
            queued = args[2] if func is torch.ops.aten.copy_.default and len(args) > 2 else kwargs.get("non_blocking", False)
            if src.device.type == "cpu" and dst.type != "cpu" and not queued:
                kd_frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if "/kd/" in f.filename]
                self.seen.append(kd_frames[-1] if kd_frames else "outside kd")
        return func(*args, **kwargs)


@pytest.mark.parametrize("wrap", ["views", "pairs", "strong"])
def test_the_fast_path_never_makes_the_host_wait_for_the_device(wrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU a blocking host-to-device copy (an index, a view, a constant) waits for every queued
    kernel: once per batch, the step's overlap with the next batch's rendering is lost. The split
    moved to the ``meta`` device stands in for the GPU: every such copy is recorded."""
    data = _views_dataset(40).to("meta")
    data = {"views": data, "pairs": ClassPairs(_views_dataset(40)).to("meta"), "strong": StrongViews(data)}[wrap]
    copies = BlockingCopies()
    with copies:
        batches = list(BatchLoader(data, 16, shuffle=True))
    assert copies.seen == []
    assert len(batches) == 3 and all(v.device.type == "meta" for b in batches for v in b.values())
    # the probe sees the blocking copies there were before ``to_device``
    for module in (kd.data.views, kd.data.pairs, kd.data.strong):
        monkeypatch.setattr(module, "to_device", lambda tensor, device: tensor.to(device))
    with copies:
        list(BatchLoader(data, 16, shuffle=True))
    assert copies.seen and all("/kd/data/" in c for c in copies.seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("wrap", ["views", "pairs", "strong"])
def test_on_a_gpu_the_fast_path_never_synchronises(wrap: str) -> None:
    data = _views_dataset(40)
    data = {"views": data, "pairs": ClassPairs(data), "strong": StrongViews(data)}[wrap].to("cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(BatchLoader(data, 16, shuffle=True, rank=1, world_size=2))  # a strided share of the order
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda for b in batches for v in b.values())
    cpu = list(BatchLoader(data.to("cpu"), 16, shuffle=True, rank=1, world_size=2))  # the same batches as on the host
    for b, c in zip(batches, cpu, strict=True):
        for k, v in b.items():
            torch.testing.assert_close(v.cpu(), c[k], rtol=0, atol=1e-6)


def _on(dm, device: str):
    """``dm`` attached to a stand-in trainer whose model lives on ``device``."""
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), global_rank=0, world_size=1)
    return dm


def test_the_dataloader_path_pins_batches_bound_for_a_gpu_only(tmp_path: Path) -> None:
    """CUDA makes the host wait for the stream before an asynchronous copy from pageable memory,
    so every step would wait for the one before: batches bound for a GPU are collated pinned."""
    root = write_cifar(tmp_path, dataset="cifar10", n_train=40, n_test=20)
    for make in (lambda: CIFARDataModule(root=str(root), dataset="cifar10", val_size=10, batch_size=8),
                 lambda: DigitsDataModule(batch_size=8)):
        for device, pinned in (("cuda", True), ("cuda:1", True), ("cpu", False)):
            dm = _on(make(), device)
            dm.setup("fit")
            loaders = (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader())
            assert [loader.pin_memory for loader in loaders] == [pinned] * 3, (type(dm).__name__, device)
        alone = make()  # no trainer: batches stay on the host
        alone.setup("fit")
        assert alone.train_dataloader().pin_memory is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_on_a_gpu_the_dataloader_path_hands_over_pinned_batches(tmp_path: Path) -> None:
    root = write_cifar(tmp_path, dataset="cifar10", n_train=40, n_test=20)
    dm = _on(CIFARDataModule(root=str(root), dataset="cifar10", val_size=10, batch_size=8), "cuda")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert all(v.is_pinned() for v in batch.values())
