"""Bad files and places, each refused with one line that says what to fix, before training, nothing lost.

Real ``kd-train`` runs in this process (``cli``): a teacher file with NaN, unwritable and non-directory
output, store and cache places, a damaged store entry, epochs that are not a positive integer, the end
of a sweep with a failed job, corrupt MNIST files, a failed run's directory reused by another config,
and the permissions of what kd writes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
from pathlib import Path

import pytest
import torch
from datagen import write_mnist

from kd.data.mnist import MNISTDataModule
from kd.errors import ConfigError
from kd.models.build import build_model
from kd.results import FAILURE_FILE, RESULTS_FILE, save_atomic, write_json_atomic
from kd.teacher.source import store_key, teacher_run_config

FAST = ("debug=fdr", "report.enabled=false")


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("kd-train:")]


def test_a_teacher_file_with_nan_is_refused_naming_the_tensor(cli, make_cfg, tmp_path: Path, capsys) -> None:
    cfg = make_cfg()
    net = build_model(cfg.model.teacher, key="model.teacher", num_classes=10, input_shape=(1, 8, 8))
    state = net.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name][0] = float("nan")
    torch.save(state, tmp_path / "teacher.pt")
    assert cli(*FAST, f"teacher.ckpt={tmp_path / 'teacher.pt'}", f"hydra.run.dir={tmp_path / 'run'}") == 2
    assert error_lines(capsys) == [
        f"kd-train: error: teacher.ckpt: {tmp_path / 'teacher.pt'} holds NaN or Inf in {name}: the run that wrote it "
        "diverged; give a checkpoint of a run that trained"]


@pytest.mark.parametrize("place", ["file", "read-only"])
def test_an_output_root_that_cannot_be_written_is_one_line(cli, tmp_path: Path, capsys, monkeypatch, place) -> None:
    root = tmp_path / "root"
    if place == "file":
        root.write_text("not a directory\n")
        why = "(Not a directory)"
    else:
        root.mkdir()
        root.chmod(0o555)
        if os.access(root, os.W_OK):  # root ignores permissions
            pytest.skip("this user can write anywhere")
        why = "(Permission denied)"
    monkeypatch.setenv("KD_OUTPUT_ROOT", str(root))
    assert cli(*FAST, "hydra.run.dir=${paths.root}/runs/x") == 2
    (line,) = error_lines(capsys)
    assert line == (f"kd-train: error: hydra.run.dir: cannot write in {root / 'runs' / 'x'} {why}; give a directory you "
                    "can write to (runs go under paths.root: KD_OUTPUT_ROOT)")


def test_a_store_or_cache_dir_that_is_a_file_is_one_line(cli, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x\n")
    assert cli(*FAST, f"teacher.store_dir={tmp_path / 'file'}", f"hydra.run.dir={tmp_path / 'a'}") == 2
    assert error_lines(capsys) == [f"kd-train: error: teacher.store_dir: {tmp_path / 'file'} is a file, not a directory; "
                                   "give a directory"]
    assert cli(*FAST, f"teacher.store_dir={tmp_path / 'store'}", "teacher_cache.enabled=true",
               f"teacher_cache.dir={tmp_path / 'file'}", f"hydra.run.dir={tmp_path / 'b'}") == 2
    assert error_lines(capsys) == [f"kd-train: error: teacher_cache.dir: {tmp_path / 'file'} is a file, not a "
                                   "directory; give a directory"]


@pytest.mark.parametrize("meta", ["", "{not json", '{"key": "x"}'])
def test_a_damaged_store_entry_is_one_line_naming_it(cli, make_cfg, tmp_path: Path, capsys, meta: str) -> None:
    store = tmp_path / "store"
    cfg = make_cfg(f"teacher.store_dir={store}")
    key, _ = store_key(teacher_run_config(cfg))
    (store / key).mkdir(parents=True)
    (store / key / "meta.json").write_text(meta)
    assert cli(*FAST, f"teacher.store_dir={store}", f"hydra.run.dir={tmp_path / 'run'}") == 2
    (line,) = error_lines(capsys)
    why = "has no metrics" if meta.startswith('{"') else "cannot be read ("
    assert line.startswith(f"kd-train: error: teacher.store_dir: the store entry {store / key} is damaged: its "
                           f"meta.json {why}") and line.endswith(f"; delete {store / key} and the teacher is trained again")


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_max_epochs_that_is_not_a_positive_integer_is_blamed_on_itself(cli, tmp_path: Path, capsys, value) -> None:
    assert cli("report.enabled=false", f"trainer.max_epochs={value}", "scheduler=none",
               f"hydra.run.dir={tmp_path / 'run'}") == 2
    shown = repr(value) if value == "abc" else value
    assert error_lines(capsys) == [f"kd-train: error: trainer.max_epochs: must be an integer >= 1, got {shown}"]
    assert not (tmp_path / "run" / RESULTS_FILE).exists()


def test_a_sweep_with_a_failed_job_ends_with_one_line_not_a_traceback(cli, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    code = cli("-m", *FAST, "distill.temperature=-1,4", f"hydra.sweep.dir={sweep}",
               f"teacher.store_dir={tmp_path / 'store'}")
    assert code == 2
    lines = error_lines(capsys)
    assert lines[0].startswith(f"kd-train: error ({sweep / '0'}): distill")
    assert lines[1:] == ["kd-train: a job of the sweep failed (ConfigError, above); the others ran. `kd-table <sweep dir>` "
                         "lists every job, the failed ones too"]
    assert json.loads((sweep / "1" / RESULTS_FILE).read_text())["status"] == "completed"


def test_a_corrupt_mnist_file_is_reported_as_corrupt_with_both_sizes(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    whole = images.read_bytes()
    images.write_bytes(whole[:-100])
    with pytest.raises(ConfigError) as e:
        MNISTDataModule(root=str(tmp_path), val_size=20).setup()
    assert str(e.value) == (f"data.root: MNIST is corrupt: {images} is {len(whole) - 100} bytes, its header "
                            f"(200 x 28 x 28) needs {len(whole)}; replace it (data.download=true fetches it)")
    images.write_bytes(whole)
    labels = raw / "train-labels-idx1-ubyte"
    data = labels.read_bytes()
    labels.write_bytes(data[:4] + struct.pack(">I", 190) + data[8:198])  # a whole file of 190 labels
    with pytest.raises(ConfigError) as e:
        MNISTDataModule(root=str(tmp_path), val_size=20).setup()
    assert str(e.value) == (f"data.root: MNIST is corrupt: {images} holds 200 images but {labels} 190 labels; "
                            "replace both (data.download=true fetches them)")


def test_a_failed_run_with_checkpoints_is_not_continued_by_another_config(cli, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "resume-step5.ckpt").write_bytes(b"")
    write_json_atomic(run / FAILURE_FILE, {"status": "failed", "error": "RuntimeError: boom",
                                           "overrides": ["distill.temperature=2"]})
    assert cli(*FAST, "distill.temperature=8", f"hydra.run.dir={run}") == 2
    assert error_lines(capsys) == [
        f"kd-train: error: hydra.run.dir: {run} holds a run that failed (RuntimeError: boom) and was started with other "
        "overrides (distill.temperature=2); give this run a new directory (hydra.run.dir=...), or rerun that run's command"]
    assert json.loads((run / FAILURE_FILE).read_text())["error"] == "RuntimeError: boom"  # its record is kept


def test_files_kd_writes_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_atomic({"w": torch.zeros(2)}, tmp_path / "a.pt")
        write_json_atomic(tmp_path / "a.json", {})
        os.umask(0o077)
        write_json_atomic(tmp_path / "b.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600



@pytest.mark.parametrize("full", ["run", "teacher training"])
def test_a_full_disk_is_one_line_naming_the_file_and_the_sizes(cli, tmp_path: Path, capsys, monkeypatch, full) -> None:
    run, store = tmp_path / "run", tmp_path / "store"
    full_dir = run if full == "run" else store
    real = shutil.disk_usage

    def usage(path):  # noqa: ANN001, ANN202 - shutil's signature
        found = real(path)
        is_full = Path(path).name == "checkpoints" and full_dir in Path(path).parents
        return found._replace(free=1000) if is_full else found

    monkeypatch.setattr(shutil, "disk_usage", usage)
    code = cli("report.enabled=false", "trainer.max_epochs=1", "checkpoint.every_n_train_steps=2",
               "+trainer.limit_train_batches=3", "teacher.recipe.max_epochs=1",
               "+teacher.recipe.trainer.limit_train_batches=2", f"teacher.store_dir={store}", f"hydra.run.dir={run}")
    assert code == 2
    (line,) = error_lines(capsys)
    where = run / "checkpoints" / "resume-step2.ckpt" if full == "run" else "/checkpoints/epoch000-step2.ckpt"
    assert line.startswith("kd-train: error: disk: no space left for ") and f"{where}: it needs " in line, line
    assert line.endswith(", 1.0 kB is free there; free some space, or write elsewhere (paths.root: KD_OUTPUT_ROOT; "
                         "teacher.store_dir)"), line
    assert not [p for p in full_dir.rglob("*.ckpt")] and not [p for p in full_dir.rglob("*.tmp")]  # nothing half-written
    assert json.loads((run / FAILURE_FILE).read_text())["error"].startswith("NoSpace: disk: no space left for ")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named_when_it_is_first_read(tmp_path: Path, workers: int) -> None:
    from datagen import write_image_folder

    from kd.data.imagenet import ImageNetDataModule

    root = write_image_folder(tmp_path / "imagenet")
    bad = sorted((root / "train").rglob("*.JPEG"))[0]
    bad.write_text("not an image\n")
    data = ImageNetDataModule(root=str(root), num_classes=3, val_per_class=1, batch_size=64, num_workers=workers,
                              image_size=16)
    data.setup("fit")
    with pytest.raises(ConfigError) as e:
        for loader in (data.train_dataloader(), data.val_dataloader()):
            for _ in loader:
                pass
    assert str(e.value).startswith(f"data.root: {bad} cannot be read as an image (UnidentifiedImageError: ")
    assert str(e.value).endswith("; remove or replace it") and "\n" not in str(e.value)


def test_a_run_waiting_for_another_runs_teacher_training_says_so_at_once(make_cfg, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    from faults import REPO
    from filelock import FileLock

    store = tmp_path / "store"
    args = (*FAST, f"teacher.store_dir={store}", f"hydra.run.dir={tmp_path / 'run'}")
    key, _ = store_key(teacher_run_config(make_cfg(*args[1:])))
    store.mkdir()
    lock = FileLock(str(store / f"{key}.lock"))
    lock.acquire()  # another run, training this teacher
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_"))}
    env.update(KD_OUTPUT_ROOT=str(tmp_path / "outputs"), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("kd-train")), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen, deadline = [], time.time() + 300
        while time.time() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            seen.append(line)
            if "waiting for another run" in line or not line:
                break
        assert f"waiting for another run, which is training teacher {key} (lock {store / key}.lock)" in seen[-1], seen
        assert proc.poll() is None  # still waiting, and said so
    finally:
        lock.release()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert json.loads((tmp_path / "run" / RESULTS_FILE).read_text())["teacher"]["key"] == key
