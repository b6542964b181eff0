"""Teachers from anywhere: pretrained weights used as is or fine-tuned, and other code bases' checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate

from kd.models import build_model, count_parameters
from kd.models import pretrained as pretrained_weights
from kd.models.cifar import resnet8
from kd.models.weights import load_weights
from kd.teacher.source import resolve_teacher, store_key, teacher_run_config
from kd.training.run import run
from tests.datagen import write_cifar

RESNET18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def offline_torch_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty torch hub cache; the network is unreachable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pretrained_weights, "reachable", lambda url, timeout=5.0: False)
    return tmp_path / "torch"


def cache_resnet18(num_classes: int) -> dict[str, torch.Tensor]:
    """A random ResNet-18 state_dict for ``num_classes``, where torch hub caches ``ResNet18_Weights.IMAGENET1K_V1``."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=num_classes).state_dict()
    path = pretrained_weights.torch_hub_file(RESNET18.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def test_a_teacher_pretrained_in_full_is_used_as_is(make_cfg, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cfg = make_cfg(f"teacher.store_dir={store}")
    datamodule = instantiate(cfg.data)
    net = build_model(cfg.model.teacher, key="model.teacher", num_classes=10, input_shape=tuple(datamodule.input_shape))
    pretrained_weights.mark_pretrained(net, "test:digits_cnn")
    before = {k: v.clone() for k, v in net.state_dict().items()}

    teacher, info = resolve_teacher(cfg, datamodule, net=net)
    assert teacher is net
    assert (info.source, info.path, info.key) == ("pretrained", "test:digits_cnn", None)
    assert info.params == count_parameters(net)
    assert {"val/acc", "test/acc"} <= set(info.metrics)  # evaluated on this run's data, as a checkpoint is
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), "the pretrained teacher was trained"
    assert not store.exists() and not (tmp_path / "run" / "teachers").exists(), "a pretrained teacher was stored"

    cfg = make_cfg(f"teacher.store_dir={store}", "teacher.evaluate=false", "teacher.train_if_missing=false")
    _, info = resolve_teacher(cfg, datamodule, net=net)  # nothing to train: no store lookup either
    assert info.source == "pretrained" and info.metrics == {}


def test_a_run_distills_from_pretrained_torchvision_weights_without_training_a_teacher(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_torch_hub: Path, capsys: pytest.CaptureFixture
) -> None:
    # weights of CIFAR-10's ten classes, under the name of ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setitem(RESNET18.meta, "categories", [f"c{i}" for i in range(10)])
    cache_resnet18(num_classes=10)
    write_cifar(tmp_path / "data", "cifar10", n_train=100, n_test=20)
    store = tmp_path / "store"
    results = run(make_cfg(
        "data=cifar10", f"paths.data_dir={tmp_path / 'data'}", "data.val_size=20", "data.augment=false",
        "model/teacher=tv_resnet34", "model.teacher.name=resnet18", "++model.teacher.weights=IMAGENET1K_V1",
        "model/student=cifar_resnet20", f"teacher.store_dir={store}",
    ))
    teacher = results["teacher"]
    assert (teacher["source"], teacher["path"], teacher["key"]) == ("pretrained", "torchvision:ResNet18_Weights.IMAGENET1K_V1", None)
    assert teacher["params"] == count_parameters(torchvision.models.resnet18(num_classes=10))
    assert "test/acc" in teacher["metrics"]
    assert not store.exists() and not (tmp_path / "run" / "teachers").exists()
    assert "teacher: pretrained, used as is: torchvision:ResNet18_Weights.IMAGENET1K_V1" in capsys.readouterr().out


def test_a_pretrained_teacher_with_a_new_head_is_fine_tuned_from_its_weights(
    make_cfg, tmp_path: Path, offline_torch_hub: Path
) -> None:
    state = cache_resnet18(num_classes=1000)
    store = tmp_path / "store"
    tiny = ("experiment=digits_resnet", "model.teacher.name=resnet18", f"teacher.store_dir={store}")
    cfg = make_cfg(*tiny, "++model.teacher.weights=IMAGENET1K_V1")
    # the store key holds the weights: a pretrained-init teacher is another teacher than a random one
    assert store_key(teacher_run_config(cfg))[0] != store_key(teacher_run_config(make_cfg(*tiny)))[0]

    teacher, info = resolve_teacher(cfg, instantiate(cfg.data))
    assert info.source == "trained" and (store / info.key / "teacher.pt").is_file()
    assert teacher.fc.out_features == 10
    # one training step away from the pretrained weights, far from another random init
    torch.manual_seed(1)
    random = torchvision.models.resnet18().state_dict()
    name = "layer4.1.conv2.weight"
    assert (teacher.state_dict()[name] - state[name]).abs().mean() < 0.25 * (random[name] - state[name]).abs().mean()


def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return resnet8(num_classes=10).state_dict()


def _optimizer_state() -> dict:
    net = resnet8(num_classes=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers: tensors nested in the optimizer's state
    return optimizer.state_dict()


@pytest.mark.parametrize("layout", ["repdistiller", "repdistiller_last", "mdistiller_distiller", "mdistiller_student", "data_parallel"])
def test_checkpoints_of_other_code_bases_load_as_teacher(tmp_path: Path, layout: str) -> None:
    state = _trained_state(seed=0)
    module = {f"module.{k}": v for k, v in state.items()}
    checkpoint = {
        # RepDistiller's train_teacher.py
        "repdistiller": {"epoch": 240, "model": state, "best_acc": torch.tensor(79.4), "optimizer": _optimizer_state()},
        # RepDistiller's <model>_last.pth: its argparse options pickled next to the weights
        "repdistiller_last": {"opt": argparse.Namespace(model="resnet8", learning_rate=0.05), "model": state},
        # mdistiller's `latest` / `best`: the DataParallel-wrapped distiller, teacher and student
        "mdistiller_distiller": {
            "epoch": 240, "best_acc": torch.tensor(71.2), "optimizer": _optimizer_state(),
            "model": {**{f"module.student.{k}": v for k, v in state.items()},
                      **{f"module.teacher.{k}": v + 1 for k, v in _trained_state(seed=1).items()}},
        },
        # mdistiller's `student_best`
        "mdistiller_student": {"model": state},
        # torch.save(DataParallel(net).state_dict()) or a DDP model's
        "data_parallel": module,
    }[layout]
    path = tmp_path / "teacher.pth"
    torch.save(checkpoint, path)
    net = resnet8(num_classes=10)
    load_weights(net, path)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
