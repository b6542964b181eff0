"""A resume checkpoint that cannot continue this run is refused in one line, before training.

Two owners decide it: ``kd.training.fit.check_resumable`` compares the checkpoint's weights with
the run's modules; a compression callback that replaces the student's structure refuses, in its
own ``Compression.check_resume``, a checkpoint written after it started.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd.compress.qat import QuantizationAwareTraining
from kd.errors import ConfigError
from kd.training.run import run


def _checkpoint(path: Path, state_dict: dict[str, torch.Tensor], epoch: int) -> Path:
    torch.save({"state_dict": state_dict, "epoch": epoch, "global_step": 3}, path)
    return path


def _nothing_trained(run_dir: Path) -> None:
    assert not (run_dir / "results.json").exists() and not (run_dir / "student.pt").exists()
    assert not (run_dir / "checkpoints").exists()


def test_a_checkpoint_of_another_model_or_method_is_refused_before_training(make_cfg, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "other.ckpt", {"student.fc.weight": torch.zeros(10, 64)}, epoch=0)
    with pytest.raises(ConfigError, match=r"^resume: .*other.ckpt is a checkpoint of another model or method: "
                                          r"\d+ missing keys \(e.g. student\..*\); 1 unexpected keys \(e.g. "
                                          r"student.fc.weight\); resume with the command that wrote it$"):
        run(make_cfg("distill=none", f"resume={ckpt}"))
    _nothing_trained(tmp_path / "run")


def test_qat_refuses_a_checkpoint_written_after_it_started(make_cfg, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "late.ckpt", {}, epoch=2)
    cfg = make_cfg("distill=none", "callbacks=[default,qat]", "callbacks.qat.start_epoch=0", f"resume={ckpt}")
    with pytest.raises(ConfigError, match=r"^resume: .*late.ckpt was written in epoch 2, after callbacks.qat changed "
                                          r"the student's structure \(from epoch 0\); kd cannot resume such a run yet"):
        run(cfg)
    _nothing_trained(tmp_path / "run")


def test_check_resume_lets_earlier_epochs_and_callbacks_that_keep_the_structure_through() -> None:
    qat = QuantizationAwareTraining(start_epoch=3)
    qat.key = "callbacks.qat"
    qat.check_resume("early.ckpt", 2)  # written before QAT changed the student: resumable
    with pytest.raises(ConfigError, match="written in epoch 3, after callbacks.qat"):
        qat.check_resume("x.ckpt", 3)
    qat.changes_structure = False  # a callback that keeps the student's modules (unstructured pruning)
    qat.check_resume("x.ckpt", 30)
