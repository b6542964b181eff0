"""The teacher-output cache: exact on every view, keyed so that it is never read for another teacher,
dataset or transform, and refusing a stale or corrupt entry clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from datagen import write_cifar

from kd.data import CIFARDataModule
from kd.data.cifar import STATS
from kd.errors import ConfigError
from kd.models.cifar import resnet8
from kd.models.features import FeatureExtractor
from kd.teacher.cache import open_cache
from kd.training.run import run


def _cifar(tmp_path: Path, seed: int = 0, augment: bool = True, n_train: int = 20) -> CIFARDataModule:
    root = write_cifar(tmp_path / f"data{seed}", dataset="cifar10", n_train=n_train, n_test=20, seed=seed)
    dm = CIFARDataModule(root=str(root), dataset="cifar10", val_size=10, augment=augment, batch_size=8)
    dm.setup("fit")
    return dm


def _teacher(seed: int = 0, nodes: tuple[str, ...] = ()) -> FeatureExtractor:
    torch.manual_seed(seed)
    net = resnet8(num_classes=10).eval()
    for m in net.modules():  # BN statistics that are not the identity, as in a trained net
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return FeatureExtractor(net, list(nodes), key="distill.teacher_nodes", input_shape=(3, 32, 32))


def _reference_view(dm: CIFARDataModule, i: int, view: int) -> torch.Tensor:
    """View ``view`` of training image ``i`` made with torchvision's own pad, crop and flip."""
    img = dm.splits["train"].images[i]  # (3, 32, 32) uint8
    flip, offset = view % 2, view // 2
    top, left = divmod(offset, 9)
    x = TF.crop(TF.pad(img, [4], fill=0), top, left, 32, 32)
    if flip:
        x = TF.horizontal_flip(x)
    mean, std = STATS["cifar10"]
    return TF.normalize(x.float() / 255.0, list(mean), list(std))


def test_cached_outputs_equal_the_teacher_on_every_exact_view(tmp_path: Path) -> None:
    dm = _cifar(tmp_path, n_train=24)
    train = dm.splits["train"]
    assert train.num_views == 162  # 9 x 9 offsets x 2 flips
    teacher = _teacher(nodes=("flatten",))
    cache = open_cache(teacher, train, tmp_path / "cache", dtype="float32", batch_size=256, verify=0)
    n = len(train)
    index = torch.arange(n).repeat_interleave(162)
    views = torch.arange(162).repeat(n)
    stored = cache.lookup(index, views)
    with torch.no_grad():  # the teacher on each view rendered independently, by torchvision, one image at a time
        fresh = [teacher(_reference_view(dm, int(i), int(v))[None]) for i, v in zip(index[::97], views[::97])]
    for k, (i, v) in enumerate(zip(index[::97], views[::97])):
        row = int(i) * 162 + int(v)
        torch.testing.assert_close(stored.logits[row], fresh[k].logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored.features["flatten"][row], fresh[k].features["flatten"][0], rtol=1e-5, atol=1e-5)
    # every stored row equals the teacher on the batch-rendered view (all 14 x 162 of them)
    with torch.no_grad():
        batched = teacher(train.render(index, views))
    torch.testing.assert_close(stored.logits, batched.logits, rtol=1e-5, atol=1e-5)
    assert len(stored.logits.unique(dim=0)) > n * 100  # the views really differ

    # float16 storage: each logit within half an fp16 ulp of the teacher's
    half = open_cache(teacher, train, tmp_path / "cache", dtype="float16", batch_size=256, verify=0)
    err = (half.lookup(index, views).logits - batched.logits).abs()
    assert torch.all(err <= batched.logits.abs() * 2.0**-11 + 2.0**-24)
    assert half.directory != cache.directory


def test_a_cache_is_never_read_for_another_teacher_dataset_or_transform(tmp_path: Path) -> None:
    dm = _cifar(tmp_path)
    a, b = _teacher(seed=0), _teacher(seed=1)
    root = tmp_path / "cache"
    base = open_cache(a, dm.splits["train"], root, verify=0)
    other_teacher = open_cache(b, dm.splits["train"], root, verify=0)
    other_data = open_cache(a, _cifar(tmp_path, seed=1).splits["train"], root, verify=0)
    no_aug = open_cache(a, _cifar(tmp_path, augment=False).splits["train"], root, verify=0)
    features = open_cache(_teacher(seed=0, nodes=("layer1",)), dm.splits["train"], root, verify=0, max_gb=1)
    dirs = {c.directory for c in (base, other_teacher, other_data, no_aug, features)}
    assert len(dirs) == 5 and len(list(root.iterdir())) == 5 + 5  # five entries and their lock files
    assert no_aug.num_views == 1 and base.num_views == 162
    # one changed weight (a BN statistic) is another teacher
    a.model.layer1[0].bn1.running_mean[0] += 1e-3
    assert open_cache(a, dm.splits["train"], root, verify=0).directory not in dirs
    # and each entry holds its own teacher's outputs
    index, views = torch.tensor([0, 5, 7]), torch.tensor([0, 80, 161])
    with torch.no_grad():
        expect = b(dm.splits["train"].render(index, views)).logits
    got = other_teacher.lookup(index, views).logits
    assert torch.all((got - expect).abs() <= expect.abs() * 2.0**-10 + 1e-4)
    assert not torch.allclose(base.lookup(index, views).logits, got, atol=1e-2)


def test_stale_or_corrupt_caches_are_rebuilt_or_refused_clearly(tmp_path: Path) -> None:
    dm = _cifar(tmp_path)
    teacher, root = _teacher(), tmp_path / "cache"
    cache = open_cache(teacher, dm.splits["train"], root, verify=0)
    entry = cache.directory
    build_time = json.loads((entry / "meta.json").read_text())["created"]
    assert open_cache(teacher, dm.splits["train"], root, verify=64).directory == entry  # a good entry verifies

    # a build that crashed: a leftover temporary directory and an entry without meta.json -> rebuilt
    (entry / "meta.json").unlink()
    leftover = entry.with_name(f".{entry.name}.tmp-999999")
    leftover.mkdir()
    rebuilt = open_cache(teacher, dm.splits["train"], root, verify=8)
    assert rebuilt.directory == entry and (entry / "meta.json").is_file() and not leftover.exists()
    assert json.loads((entry / "meta.json").read_text())["created"] >= build_time

    # values changed behind kd's back: refused, naming what to delete
    logits = np.load(entry / "logits.npy", mmap_mode="r+")
    logits[:] += 1.0
    logits.flush()
    del logits
    with pytest.raises(ConfigError, match=rf"^teacher_cache: {entry} disagrees with the teacher on logits .*delete {entry}"):
        open_cache(teacher, dm.splits["train"], root, verify=16)

    # a truncated array file
    (entry / "logits.npy").write_bytes((entry / "logits.npy").read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"^teacher_cache: cannot read the arrays of {entry}.*delete {entry}"):
        open_cache(teacher, dm.splits["train"], root, verify=0)

    # an entry whose recorded key is not this run's (moved or copied by hand)
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["sha256"] = "0" * 64
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"^teacher_cache: .* was built for another teacher, data or transform"):
        open_cache(teacher, dm.splits["train"], root, verify=0)


def test_a_top_k_cache_keeps_the_top_logits_and_the_probability_of_the_rest(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "data", dataset="cifar100", n_train=22, n_test=10, seed=0, labels_used=5)
    dm = CIFARDataModule(root=str(root), dataset="cifar100", val_size=10, augment=True, batch_size=8)
    dm.setup("fit")
    train, k = dm.splits["train"], 5
    torch.manual_seed(0)
    net = resnet8(num_classes=100).eval()
    teacher = FeatureExtractor(net, [], key="distill.teacher_nodes", input_shape=(3, 32, 32))
    cache = open_cache(teacher, train, tmp_path / "cache", dtype="float32", top_k=k, verify=8)
    n = len(train)
    index, views = torch.arange(n).repeat_interleave(162), torch.arange(162).repeat(n)
    with torch.no_grad():
        full = teacher(train.render(index, views)).logits  # (n * 162, 100)
    got = cache.lookup(index, views).logits
    top, classes = full.topk(k, dim=1)
    # the teacher's top k classes and their logits, exactly
    torch.testing.assert_close(got.gather(1, classes), top, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.topk(k, dim=1).indices.sort(1).values, classes.sort(1).values)
    # one value for every other class, carrying exactly the probability mass the top k leave out
    rest = got.scatter(1, classes, float("nan"))
    others = rest[~rest.isnan()].view(len(got), 100 - k)
    assert torch.all(others == others[:, :1])
    torch.testing.assert_close(torch.logsumexp(got, 1), torch.logsumexp(full, 1), rtol=1e-5, atol=1e-5)
    p, q = full.softmax(1), got.softmax(1)
    torch.testing.assert_close(q.gather(1, classes), p.gather(1, classes), rtol=1e-5, atol=1e-6)
    left_out = 1 - p.gather(1, classes).sum(1)  # (rows,)
    torch.testing.assert_close(q.scatter(1, classes, 0.0).sum(1), left_out, rtol=1e-4, atol=1e-6)
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert meta["tail_mass"]["mean"] == pytest.approx(float(left_out.mean()), rel=1e-4)
    assert meta["tail_mass"]["max"] == pytest.approx(float(left_out.max()), rel=1e-4)
    # stored compactly: k values (float32), k class indices (int16) and the tail (float32) per view
    assert cache.nbytes == n * 162 * (k * 4 + k * 2 + 4)
    assert sorted(p.name for p in cache.directory.glob("*.npy")) == ["tail.npy", "topk_indices.npy", "topk_values.npy"]

    # another k, full logits and float16 are other entries; float16 values within half an ulp
    half = open_cache(teacher, train, tmp_path / "cache", dtype="float16", top_k=k, verify=8)
    dirs = {cache.directory, half.directory, open_cache(teacher, train, tmp_path / "cache", top_k=10, verify=0).directory,
            open_cache(teacher, train, tmp_path / "cache", verify=0).directory}
    assert len(dirs) == 4
    err = (half.lookup(index, views).logits.gather(1, classes) - top).abs()
    assert torch.all(err <= top.abs() * 2.0**-11 + 2.0**-24)

    # a changed tail or wrong classes are refused when spot-checked
    entry = cache.directory
    tail = np.load(entry / "tail.npy", mmap_mode="r+")
    tail[:] += 0.5
    tail.flush()
    del tail
    with pytest.raises(ConfigError, match=rf"^teacher_cache: {entry} disagrees with the teacher on the tail"):
        open_cache(teacher, train, tmp_path / "cache", dtype="float32", top_k=k, verify=4)
    np.save(entry / "tail.npy", np.asarray(cache.rows(index, views)["tail"].view(n, 162) - 0.5, dtype=np.float32))
    cache._arrays = None
    indices = np.load(entry / "topk_indices.npy", mmap_mode="r+")
    indices[..., 0] = (indices[..., 0] + 50) % 100  # the top class replaced by one outside the top k, mostly
    indices.flush()
    del indices
    with pytest.raises(ConfigError, match=rf"^teacher_cache: {entry} (does not hold the teacher's top 5|disagrees .* top-k logits)"):
        open_cache(teacher, train, tmp_path / "cache", dtype="float32", top_k=k, verify=16)

    # a k the teacher cannot have is refused before anything is written
    with pytest.raises(ConfigError, match=r"^teacher_cache.top_k: must be below the teacher's 100 classes, got 100"):
        open_cache(teacher, train, tmp_path / "other", top_k=100)
    with pytest.raises(ConfigError, match=r"^teacher_cache.top_k: must be an integer >= 1"):
        open_cache(teacher, train, tmp_path / "other", top_k=0)
    assert not any(p.is_dir() for p in (tmp_path / "other").glob("*"))


def test_bad_cache_settings_fail_before_anything_is_built(tmp_path: Path) -> None:
    dm = _cifar(tmp_path)
    root = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"^teacher_cache.max_gb: the cache would take .* GB \(10 samples x 162 views"):
        open_cache(_teacher(nodes=("layer1",)), dm.splits["train"], root, max_gb=0.01)
    with pytest.raises(ConfigError, match=r"^teacher_cache.dtype: must be one of float16, float32"):
        open_cache(_teacher(), dm.splits["train"], root, dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"^teacher_cache.enabled: the training inputs of data are not a finite set"):
        open_cache(_teacher(), object(), root)
    with pytest.raises(ConfigError, match=r"^teacher_cache.enabled: no teacher cache at .* multi-process launch"):
        open_cache(_teacher(), dm.splits["train"], root, build=False)
    assert not any(p.is_dir() for p in root.glob("*")) if root.exists() else True


@pytest.mark.parametrize("method", ["kd", "crd"])  # logits only; logits and the pooled features
def test_a_run_with_the_cache_trains_like_the_run_without(make_cfg, tmp_path: Path, method: str) -> None:
    """Same seed, same data order: the float32 cache gives the teacher's outputs, so the same student."""
    results = {}
    for cached in (False, True):
        cfg = make_cfg(f"distill={method}", "distill.nce_k=64" if method == "crd" else "distill.temperature=4",
                       "trainer.max_epochs=2", "teacher.recipe.max_epochs=1", f"teacher_cache.enabled={cached}",
                       "teacher_cache.dtype=float32", "report.enabled=false", "callbacks=none",
                       "trainer.enable_checkpointing=false", fast=False, run_dir=f"run{int(cached)}")
        results[cached] = run(cfg)
    plain, cached = results[False]["student"]["final_metrics"], results[True]["student"]["final_metrics"]
    assert plain.keys() == cached.keys()
    for k in plain:
        assert cached[k] == pytest.approx(plain[k], abs=1e-6), k
    meta = json.loads(next((tmp_path / "outputs" / "teacher_cache").glob("convnet-*/meta.json")).read_text())
    assert meta["features"] == ([results[True]["config"]["distill"]["teacher_nodes"][0]] if method == "crd" else [])
