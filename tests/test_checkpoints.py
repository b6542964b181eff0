"""The parts of exact resume and safe checkpoints, one at a time: atomic writes, finding the checkpoint
to resume from, loaders resumed mid-epoch, per-step seeds, refusing a checkpoint of another model."""

from __future__ import annotations

import fractions
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.data.fast import BatchLoader
from kd.data.order import ResumableLoader
from kd.data.views import ImageViews, PadCrop
from kd.errors import ConfigError
from kd.models.weights import CorruptCheckpoint, load_checkpoint
from kd.results import write_json_atomic
from kd.training.checkpoints import SafeCheckpointIO, StepSeeds, find_resume


def _views(n: int = 45) -> ImageViews:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageViews(images, torch.arange(n) % 5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), PadCrop(2, flip=True))


def _training_checkpoint(step: int) -> dict:
    return {"global_step": step, "loops": {}, "state_dict": {"w": torch.full((2,), float(step))}}


def test_a_write_killed_midway_leaves_the_previous_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_training_checkpoint(4), path)
    results = tmp_path / "results.json"
    write_json_atomic(results, {"status": "completed"})

    def dies_midway(obj: object, f) -> None:  # noqa: ANN001
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped in the middle of the write

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(_training_checkpoint(8), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["global_step"] == 4  # the previous file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind

    def killed(fd: int) -> None:  # the new JSON is written in full, the process dies before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("os.fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(results, {"status": "failed", "error": "x" * 10_000})
    monkeypatch.undo()
    assert json.loads(results.read_text()) == {"status": "completed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "results.json"]


def test_find_resume_takes_the_highest_step_that_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpts = tmp_path / "checkpoints"
    assert find_resume(tmp_path) is None  # nothing yet: a fresh run
    io = SafeCheckpointIO()
    for step in (4, 8, 12):
        io.save_checkpoint(_training_checkpoint(step), ckpts / f"resume-step{step}.ckpt")
    torch.save({"w": torch.ones(2)}, ckpts / "weights-only.ckpt")  # a state_dict, not a training checkpoint
    data = (ckpts / "resume-step12.ckpt").read_bytes()
    (ckpts / "resume-step12.ckpt").write_bytes(data[: len(data) // 3])
    io.save_checkpoint(_training_checkpoint(10), tmp_path / "hpc_ckpt_1.ckpt")  # Lightning's SLURM requeue
    with caplog.at_level("WARNING"):
        assert find_resume(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    assert "resume-step12.ckpt is truncated or corrupt" in caplog.text
    assert "weights-only.ckpt, which is not a training checkpoint" in caplog.text
    (tmp_path / "hpc_ckpt_1.ckpt").unlink()
    assert find_resume(tmp_path) == ckpts / "resume-step8.ckpt"


def test_a_checkpoint_that_needs_pickle_is_refused_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({**_training_checkpoint(3), "hparams": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ConfigError) as refused:
        load_checkpoint(path)
    assert not isinstance(refused.value, CorruptCheckpoint)  # not skipped by resume=auto as if it were broken
    assert str(refused.value) == (f"resume: {path} holds more than weights (a pickled fractions.Fraction); loading it "
                                  "runs arbitrary code from the file (pickle); if you trust its source, set "
                                  "checkpoint.allow_pickle=true")
    assert load_checkpoint(path, allow_pickle=True)["hparams"] == fractions.Fraction(1, 3)
    with pytest.raises(ConfigError, match=f"resume: no checkpoint file at {tmp_path / 'missing.ckpt'}"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "list.ckpt").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CorruptCheckpoint, match="is not a checkpoint"):
        load_checkpoint(tmp_path / "list.ckpt")


def _batches(loader: object, count: int | None = None) -> list[dict]:
    out = []
    for batch in loader:  # type: ignore[attr-defined]
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["index"], y["index"]) and torch.equal(x["view"], y["view"]) and torch.equal(x["input"], y["input"])
        for x, y in zip(a, b)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_mid_epoch_serves_what_the_uninterrupted_one_would(workers: int) -> None:
    data = _views()
    whole = ResumableLoader(data, 8, seed=11, num_workers=workers)
    epochs = []
    for e in range(3):
        whole.sampler.set_epoch(e)  # what Lightning does at each epoch start
        epochs.append(_batches(whole))
    assert len(epochs[0]) == 6 and not _same(epochs[0], epochs[1])  # a new order and new views each epoch

    stopped = ResumableLoader(data, 8, seed=11)
    stopped.sampler.set_epoch(1)
    assert _same(_batches(stopped, 2), epochs[1][:2])
    state = stopped.state_dict()
    assert state == {"epoch": 1, "batches": 2, "seed": 11}

    resumed = ResumableLoader(data, 8, seed=11, num_workers=workers)  # a new process, other workers
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert _same(_batches(resumed), epochs[1][2:])  # the rest of epoch 1, from the next batch
    resumed.sampler.set_epoch(2)
    assert _same(_batches(resumed), epochs[2])
    with pytest.raises(ValueError, match="seed 11, this run 12"):
        ResumableLoader(data, 8, seed=12).load_state_dict(state)


def test_the_fast_loader_resumed_mid_epoch_serves_what_the_uninterrupted_one_would() -> None:
    data = _views()
    whole = BatchLoader(data, 8, shuffle=True, seed=5)
    epochs = []
    for e in range(2):
        whole.set_epoch(e)
        epochs.append(_batches(whole))
    stopped = BatchLoader(data, 8, shuffle=True, seed=5)
    stopped.set_epoch(1)
    _batches(stopped, 4)
    resumed = BatchLoader(data, 8, shuffle=True, seed=5)
    resumed.load_state_dict(stopped.state_dict())
    resumed.set_epoch(1)
    assert _same(_batches(resumed), epochs[1][4:])
    # saved after the epoch's last batch: the next iteration is the next epoch, whole
    done = BatchLoader(data, 8, shuffle=True, seed=5)
    done.set_epoch(0)
    _batches(done)
    after = BatchLoader(data, 8, shuffle=True, seed=5)
    after.load_state_dict(done.state_dict())
    assert _same(_batches(after), epochs[1])


class _Trainer:
    global_rank, current_epoch = 0, 0


def test_step_seeds_make_a_batchs_draws_independent_of_what_came_before() -> None:
    trainer = _Trainer()

    def draws(batch: int, epoch: int = 0, rank: int = 0, seed: int = 7) -> tuple:
        trainer.current_epoch, trainer.global_rank = epoch, rank
        StepSeeds(seed).on_train_batch_start(trainer, None, None, batch)  # type: ignore[arg-type]
        return torch.rand(3).tolist(), float(np.random.rand()), random.random()

    first = draws(5)
    torch.rand(100), np.random.rand(7), random.random()  # whatever happened in between
    assert draws(5) == first
    others = [draws(6), draws(5, epoch=1), draws(5, rank=1), draws(5, seed=8)]
    assert all(o != first for o in others) and len({str(o) for o in others}) == 4
