"""Bad input fails before training with one clear line, and nothing written is lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from kd.errors import ConfigError
from kd.models import ConvNet
from kd.training.run import run
from tests.conftest import compose_cfg


def _assert_nothing_trained(run_dir: Path) -> None:
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "results.json").exists()


def test_unknown_group_option_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(["distill=kdd"], tmp_path)
    message = str(err.value)
    assert "distill/kdd" in message and "\tkd\n" in message and "\tnone" in message


def test_typo_in_a_config_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="temprature"):
        compose_cfg(["distill.temprature=4"], tmp_path)


@pytest.mark.parametrize(
    ("override", "key", "text"),
    [
        ("distill.temperature=0", "distill.temperature", "must be > 0"),
        ("distill.temperature=-2", "distill.temperature", "must be > 0"),
        ("distill.weight=-0.5", "distill.weight", ">= 0"),
        ("distill.ce_weight=-0.1", "distill.ce_weight", ">= 0"),
        ("data.val_fraction=1.2", "data.val_fraction", "(0, 1)"),
        ("data.batch_size=0", "data.batch_size", ">= 1"),
        ("+model.student.num_classes=7", "model.student.num_classes", "the data has 10"),
        ("+model.teacher.num_classes=100", "model.teacher.num_classes", "the data has 10"),
        ("model.student.channels=[]", "model.student.channels", "positive widths"),
        ("teacher.train_if_missing=false", "teacher.ckpt", "none stored"),
        ("distill.temperature=inf", "distill.temperature", "finite"),
        ("+model.student.num_classes=ten", "model.student.num_classes", "must be an integer"),
        ("seed=-1", "seed", "[0, 2**32)"),
        ("seed=abc", "seed", "[0, 2**32)"),
        ("data.split_seed=-1", "data.split_seed", ">= 0"),
        ("data.num_workers=-1", "data.num_workers", ">= 0"),
        ("optimizer.lr=-1", "optimizer", "Invalid learning rate"),
        ("scheduler.T_max=0", "scheduler", "fails when stepped"),
        ("teacher.recipe.optimizer.lr=-1", "teacher.recipe.optimizer", "Invalid learning rate"),
        ("teacher.recipe.scheduler.T_max=0", "teacher.recipe.scheduler", "fails when stepped"),
        ("teacher.recipe.trainer.precision=fp7", "teacher.recipe.trainer", "fp7"),
        ("trainer.precision=fp7", "trainer", "fp7"),
        ("trainer.enable_checkpointing=false", "trainer", "ModelCheckpoint"),
        ("distill=none distill.label_smoothing=1", "distill.label_smoothing", "[0, 1)"),
    ],
)
def test_bad_values_fail_before_training(make_cfg, tmp_path: Path, override: str, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        run(make_cfg(*override.split()))
    assert err.value.key == key
    assert text in err.value.message and "\n" not in str(err.value)
    _assert_nothing_trained(tmp_path / "run")
    assert not list(tmp_path.rglob("teacher.pt"))


def test_missing_teacher_checkpoint(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"file not found: .*nope\.ckpt") as err:
        run(make_cfg(f"teacher.ckpt={tmp_path / 'nope.ckpt'}"))
    assert err.value.key == "teacher.ckpt"
    _assert_nothing_trained(tmp_path / "run")


def test_teacher_checkpoint_of_another_architecture(make_cfg, tmp_path: Path) -> None:
    torch.save(ConvNet(num_classes=10, in_channels=1, channels=(8, 16)).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ConfigError, match="does not fit model.teacher") as err:
        run(make_cfg(f"teacher.ckpt={tmp_path / 'small.pt'}"))
    assert "size mismatch" in err.value.message or "missing keys" in err.value.message
    _assert_nothing_trained(tmp_path / "run")


def test_teacher_checkpoint_with_another_number_of_classes(make_cfg, tmp_path: Path) -> None:
    net = ConvNet(num_classes=7, in_channels=1, channels=[64, 128], depth=2, hidden=256)
    torch.save(net.state_dict(), tmp_path / "seven.pt")
    with pytest.raises(ConfigError, match=r"size mismatch for head\.\d+\.weight \(7, 256\)"):
        run(make_cfg(f"teacher.ckpt={tmp_path / 'seven.pt'}"))
    _assert_nothing_trained(tmp_path / "run")


def test_corrupt_teacher_checkpoint(make_cfg, tmp_path: Path) -> None:
    net = ConvNet(num_classes=10, in_channels=1, channels=[64, 128], depth=2, hidden=256)
    torch.save(net.state_dict(), tmp_path / "t.pt")
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ConfigError, match="cannot read .* as a PyTorch checkpoint"):
        run(make_cfg(f"teacher.ckpt={tmp_path / 't.pt'}"))
    _assert_nothing_trained(tmp_path / "run")


def test_results_of_an_earlier_run_are_never_overwritten(make_cfg, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"earlier": true}')
    with pytest.raises(ConfigError, match="already holds the results.json"):
        run(make_cfg())
    assert (tmp_path / "run" / "results.json").read_text() == '{"earlier": true}'


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_trainer_without_a_gpu(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot build lightning.pytorch.Trainer") as err:
        run(make_cfg("trainer=gpu"))
    assert err.value.key == "trainer" and "\n" not in str(err.value)
    _assert_nothing_trained(tmp_path / "run")
    assert not list(tmp_path.rglob("teacher.pt"))


def test_no_teacher_is_trained_inside_a_multi_process_launch(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="run the same command once on a single device first"):
        run(make_cfg())
    assert not list(tmp_path.rglob("teacher.pt"))


def test_a_target_that_cannot_be_imported_is_one_line_naming_the_module(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        run(make_cfg("data._target_=my_lab.data.WineDataModule"))
    assert str(err.value) == (
        "data: cannot build my_lab.data.WineDataModule: cannot import it (No module named 'my_lab'); is the "
        "_target_ spelled right and its module on the Python path (PYTHONPATH)?")
    _assert_nothing_trained(tmp_path / "run")
