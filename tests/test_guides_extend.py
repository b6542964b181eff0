"""The worked examples of docs/writing-a-datamodule.md and docs/writing-a-compression-callback.md.

Each example is plugged into the real config as a user would (``hydra.searchpath`` to
``docs/examples/conf``, ``docs/examples`` on ``sys.path``) and run with ``kd.training.run.run``;
the tests check what the guides promise: the wine splits and their normalisation, the one-line
errors, and that the weight-sharing callback leaves at most ``2**bits`` values per layer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.datasets import load_wine

from kd.data.protocol import IndexedData, ViewData, check_datamodule
from kd.errors import ConfigError
from kd.training.run import run

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
SEARCHPATH = f"hydra.searchpath=[file://{EXAMPLES / 'conf'}]"
WINE = (SEARCHPATH, "data=wine", "model/teacher=hinton_mlp", "model/student=hinton_mlp_30")


@pytest.fixture(autouse=True)
def examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``PYTHONPATH=docs/examples`` does for ``kd-train``: the configs' targets import."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def _distinct_nonzero(w: torch.Tensor) -> int:
    return int(torch.unique(w[w != 0]).numel())


# --- docs/writing-a-datamodule.md ------------------------------------------------------------


def test_wine_splits_are_stratified_disjoint_and_normalised_with_the_training_split_only() -> None:
    from wine_data import WineDataModule

    dm = check_datamodule(WineDataModule(batch_size=32))
    assert isinstance(dm, IndexedData) and isinstance(dm, ViewData)  # CRD and the teacher cache can use it
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 115, "val": 27, "test": 36}
    idx = np.concatenate([dm.split_indices[s] for s in ("train", "val", "test")])
    assert np.array_equal(np.sort(idx), np.arange(178))  # each wine in exactly one split
    wine = load_wine()
    for name, split in dm.splits.items():  # each cultivar in every split, in proportion (59/71/48)
        counts = np.bincount(split.targets.numpy(), minlength=3)
        assert np.abs(counts / len(split) - np.bincount(wine.target) / 178).max() < 0.03, name
    train = torch.as_tensor(wine.data[dm.split_indices["train"]], dtype=torch.float32)
    torch.testing.assert_close(dm.mean, train.mean(0))
    torch.testing.assert_close(dm.std, train.std(0))
    assert not torch.allclose(dm.mean, torch.as_tensor(wine.data, dtype=torch.float32).mean(0))
    x = dm.splits["train"].inputs  # (115, 13)
    torch.testing.assert_close(x.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(13), atol=1e-5, rtol=0)
    val = torch.as_tensor(wine.data[dm.split_indices["val"]], dtype=torch.float32)
    torch.testing.assert_close(dm.splits["val"].inputs, (val - dm.mean) / dm.std)  # the same statistics
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (32, 13) and batch["target"].dtype == torch.long
    assert torch.equal(dm.train_targets()[batch["index"]], batch["target"])


def test_check_datamodule_names_the_missing_member_in_one_line() -> None:
    class Half(L.LightningDataModule):  # LightningDataModule gives setup and the three loaders
        num_classes = 3

    with pytest.raises(ConfigError) as e:
        check_datamodule(Half())
    assert str(e.value) == (
        "data: Half lacks input_shape; a kd datamodule has num_classes, input_shape, setup, train_dataloader, "
        "val_dataloader, test_dataloader (see kd.data.protocol and docs/writing-a-datamodule.md)"
    )


def test_kd_distills_an_mlp_teacher_into_an_mlp_student_on_wine(make_cfg, tmp_path: Path) -> None:
    results = run(make_cfg(*WINE, "teacher_cache.enabled=true"))
    assert results["data"] == {"name": "WineDataModule", "num_classes": 3, "input_shape": [13], "test_size": 36}
    # in_features=13 and num_classes=3 come from the data: 13-1200-1200-3 and 13-30-30-3
    assert results["teacher"]["params"] == 13 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 3 + 3 == 1_461_603
    assert results["student"]["params"] == 13 * 30 + 30 + 30 * 30 + 30 + 30 * 3 + 3 == 1_443
    assert results["config"]["data"]["_target_"] == "wine_data.WineDataModule"
    assert 0.0 <= results["student"]["metrics"]["test/acc"] <= 1.0
    assert list((tmp_path / "outputs" / "teacher_cache").glob("mlp-*/logits.npy"))  # a cache over its splits


# --- docs/writing-a-compression-callback.md ------------------------------------------------------


def test_kmeans_1d_matches_hand_derived_clusters() -> None:
    from weight_sharing import kmeans_1d

    centroids, assignment = kmeans_1d(torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0]), k=2, iterations=5)
    torch.testing.assert_close(centroids, torch.tensor([1.0, 11.0]))
    assert assignment.tolist() == [0, 0, 0, 1, 1, 1]
    # linear initialisation at 0, 5, 10: nothing is near 5, so that cluster stays empty and unmoved
    centroids, assignment = kmeans_1d(torch.tensor([0.0, 1.0, 9.0, 10.0]), k=3, iterations=3)
    torch.testing.assert_close(centroids, torch.tensor([0.5, 5.0, 9.5]))
    assert assignment.tolist() == [0, 0, 2, 2]


SHARE = (SEARCHPATH, "callbacks=weight_sharing", "callbacks.share.bits=2", "callbacks.share.start_epoch=1",
         "trainer.max_epochs=2", "trainer.limit_train_batches=3")


def test_weight_sharing_leaves_at_most_2_pow_bits_values_per_layer_in_the_deployed_student(
    make_cfg, tmp_path: Path
) -> None:
    results = run(make_cfg(*SHARE))
    student = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    shared = {k: v for k, v in student.items() if k.endswith("weight") and v.dim() > 1}  # conv and linear
    assert sorted(shared) == ["features.0.weight", "features.4.weight", "head.2.weight"]
    assert {k: _distinct_nonzero(v) for k, v in shared.items()} == dict.fromkeys(shared, 4)
    program = torch.export.load(tmp_path / "run" / "student.pt2").state_dict  # what ships keeps the sharing
    assert all(_distinct_nonzero(program[k]) == 4 for k in shared)
    (summary,) = results["report"]["compression"]
    n = sum(v.numel() for v in shared.values())
    assert summary == {
        "callback": "WeightSharing", "bits": 2, "start_epoch": 1, "iterations": 20, "modules": ["conv", "linear"],
        "distinct_values": dict.fromkeys(shared, 4), "shared_weights": n,
        "compression_rate": round(n * 32 / (n * 2 + 3 * 4 * 32), 3),  # eq. 1 of Deep Compression
    }
    rows = {r["name"]: r for r in results["report"]["rows"]}
    assert rows["student_dense"]["dense_epoch"] == 1  # snapshot just before clustering
    assert results["student"]["best_epoch"] == 1  # selection only among the shared epochs
    assert json.loads((tmp_path / "run" / "results.json").read_text())["report"]["compression"] == [summary]


def test_weight_sharing_after_pruning_keeps_the_zeros(make_cfg, tmp_path: Path) -> None:
    """Deep Compression's pipeline: one-shot pruning at epoch 0, sharing of the survivors from epoch 1."""
    results = run(make_cfg(*SHARE, "callbacks=[prune_oneshot,weight_sharing]", "callbacks.prune.start_epoch=0",
                           "callbacks.prune.final_sparsity=0.5"))
    prune, share = results["report"]["compression"]
    assert prune["callback"] == "MagnitudePruning" and share["callback"] == "WeightSharing"
    assert abs(prune["sparsity"] - 0.5) < 0.01  # measured after sharing: no pruned weight came back
    student = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    for name, n in share["distinct_values"].items():
        assert _distinct_nonzero(student[name]) == n <= 4
    zeros = sum(int((student[k] == 0).sum()) for k in share["distinct_values"])
    assert zeros == prune["pruned_weights"]
    # a layer holding zeros needs an index for zero too: 4 values and zero take 3 bits
    weights = [student[k] for k in share["distinct_values"]]
    shared_bits = sum(w.numel() * math.ceil(math.log2(4 + int((w == 0).any()))) + 4 * 32 for w in weights)
    assert share["compression_rate"] == round(share["shared_weights"] * 32 / shared_bits, 3)


@pytest.mark.parametrize(("overrides", "line"), [
    (("callbacks.share.start_epoch=20",),
     "callbacks.share.start_epoch: is 20 but trainer.max_epochs is 1; weight sharing must start in a trained "
     "epoch (0 to 0)"),
    (("callbacks.share.bits=12",), "callbacks.share.bits: must be an integer in [1, 8], got 12"),
    (("callbacks.share.modules=[lstm]",),
     "callbacks.share.modules: must be a non-empty list of conv, linear, Conv1d, Conv2d, Conv3d, ConvTranspose1d, "
     "ConvTranspose2d, ConvTranspose3d, Linear, got ['lstm']"),
    (("callbacks=[early_stopping,weight_sharing]", "callbacks.share.start_epoch=0"),
     "callbacks: early stopping could end training before callbacks.share finishes; drop it "
     "(callbacks=[default,...]): checkpoints are selected on val among compressed epochs"),
])
def test_weight_sharing_refuses_bad_values_before_anything_trains(
    make_cfg, tmp_path: Path, overrides: tuple[str, ...], line: str
) -> None:
    with pytest.raises(ConfigError) as e:
        run(make_cfg(SEARCHPATH, "callbacks=weight_sharing", *overrides))
    assert str(e.value) == line
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "teachers").exists()


def test_a_run_resumed_after_clustering_continues_the_same_clusters(make_cfg, tmp_path: Path) -> None:
    """``changes_structure`` is False, so kd resumes such a run: the clusters travel in the checkpoint."""
    common = (*SHARE, "checkpoint.every_n_train_steps=4", f"teacher.store_dir={tmp_path / 'store'}",
              "report.enabled=false")
    run(make_cfg(*common, run_dir="whole"))  # 3 steps an epoch: step 4 is in epoch 1, after clustering
    mid = tmp_path / "whole" / "checkpoints" / "resume-step4.ckpt"
    state = torch.load(mid, weights_only=True)
    (saved,) = [v for k, v in state["callbacks"].items() if k.startswith("WeightSharing")]
    assert sorted(saved["assignments"]) == ["features.0.weight", "features.4.weight", "head.2.weight"]
    run(make_cfg(*common, f"resume={mid}", run_dir="resumed"))
    whole, resumed = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
                      for d in ("whole", "resumed"))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
