"""Multi-process DDP on CPU, end to end: ``kd-train trainer=ddp_cpu`` in 2 gloo processes on digits.

Each run is a real ``kd-train`` subprocess: Lightning's ``ddp`` starts rank 1 by running the
command again, which needs a real script (and keeps the ranks' environment out of pytest's). The
relaunch is what torchrun and SLURM clusters do; a multirun uses a strategy that forks inside
the job instead (the refusal of plain ``ddp`` in a multirun is tested in tests/test_cli.py,
``test_multirun_with_script_relaunching_ddp_is_refused``). The end-to-end tests take one to two
minutes each and are marked slow (``-m "not slow"`` leaves them out).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate

from kd.compress.evaluate import evaluate_model, rebuild_student
from kd.results import RESULTS_FILE, STUDENT_WEIGHTS
from kd.training.loggers import CSVLogger

WORLD_SIZE = 2  # conf/trainer/ddp_cpu.yaml
# Short runs: the student trains on all of digits' training split (so that steps per epoch show
# the split between ranks); the teacher on a few batches; the report times one batch.
SHORT = (
    "trainer=ddp_cpu", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
    "teacher.recipe.max_epochs=1", "+teacher.recipe.trainer.limit_train_batches=4",
    "report.onnx=false", "report.teacher=false", "report.latency.batch_sizes=[1]",
    "report.latency.warmup=0", "report.latency.repeats=1",
)
# variables of a launch this test may itself run under (SLURM, torchrun): not the child's to see
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "PL_GLOBAL_SEED")


def kd_train(tmp_path: Path, *args: str) -> tuple[int, str]:
    """Runs ``kd-train *args`` in a fresh process from an empty directory; exit status and output.

    Outputs go only where ``args`` say, else under ``tmp_path/outputs`` (``KD_OUTPUT_ROOT``).
    """
    cwd = tmp_path / "cwd"  # Lightning starts rank 1 here: it must stay empty
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    env.update(KD_OUTPUT_ROOT=str(tmp_path / "outputs"), PYTHONUNBUFFERED="1")
    script = Path(sys.executable).with_name("kd-train")
    done = subprocess.run([str(script), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    return done.returncode, done.stdout


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def full_split_accuracy(weights: Path, data_cfg: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """Accuracy of a run's student with ``weights`` on every sample of val and test, in one process."""
    model, _ = rebuild_student(weights)
    data = instantiate(data_cfg)
    data.setup("fit")
    return {split: evaluate_model(model, getattr(data, f"{split}_dataloader")()) for split in ("val", "test")}


@pytest.mark.slow
def test_ddp_run_writes_once_and_reports_metrics_of_the_whole_split(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Every epoch's checkpoint is kept, and mode=min selects the one with the lowest val/acc, the
    # first: the selected weights differ from the final ones, and both are on disk to check.
    # -v: Lightning's lines (the backend, each rank's membership) are the evidence read below
    code, out = kd_train(tmp_path, "-v", *SHORT, "callbacks.model_checkpoint.mode=min",
                         "callbacks.model_checkpoint.save_top_k=-1", f"teacher.store_dir={tmp_path / 'store'}",
                         f"hydra.run.dir={run_dir}")
    assert code == 0, out[-3000:]
    assert "distributed_backend=gloo" in out and f"GLOBAL_RANK: 1, MEMBER: 2/{WORLD_SIZE}" in out
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    student = results["student"]
    assert results["world_size"] == 2
    assert student["selected"] == "best_val" and student["best_epoch"] == 0 and student["epochs"] == 2
    assert "error" not in results["report"], results["report"]

    # the ranks' data: digits' val and test splits divide evenly, so DistributedSampler pads none
    data = instantiate(results["config"]["data"])
    data.setup("fit")
    sizes = {split: len(data.splits[split]) for split in ("train", "val", "test")}
    assert (sizes["val"], sizes["test"]) == (270, 360) and sizes["val"] % WORLD_SIZE == sizes["test"] % WORLD_SIZE == 0
    # 2 ranks: each rank takes half of the training split, an epoch is half as many steps
    batch = results["config"]["data"]["batch_size"]
    steps = math.ceil(math.ceil(sizes["train"] / WORLD_SIZE) / batch)
    assert (steps, math.ceil(sizes["train"] / batch)) == (10, 19)  # digits: 1,167 training samples

    # one writer: one run directory, nothing from rank 1 but its own log, nothing anywhere else
    assert Path(student["checkpoint"]).name == f"epoch000-step{steps}.ckpt"
    assert files_under(run_dir) == {
        ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
        f"checkpoints/epoch000-step{steps}.ckpt", f"checkpoints/epoch001-step{2 * steps}.ckpt", "checkpoints/last.ckpt",
        "csv/hparams.yaml", "csv/metrics.csv", RESULTS_FILE, STUDENT_WEIGHTS, "student.pt2",
        "train.log", "train_ddp_process_1.log",
    }
    assert not any((tmp_path / "cwd").iterdir()) and not (tmp_path / "outputs").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * steps
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["epoch"]), int(r["step"])) for r in rows if r["train/loss"]]
    assert train == [(0, steps - 1), (1, 2 * steps - 1)]  # one row per epoch, not one per rank
    assert len([r for r in rows if r["val/acc"]]) == 2 + 2  # each epoch, then the final and the selected weights
    assert len([r for r in rows if r["test/acc"]]) == 2

    # the metrics gathered over the ranks are those of the whole split, for the selected weights
    # (student.pt) and for the final ones (last.ckpt)
    for metrics, weights in ((student["metrics"], run_dir / STUDENT_WEIGHTS),
                             (student["final_metrics"], run_dir / "checkpoints" / "last.ckpt")):
        recomputed = full_split_accuracy(weights, results["config"]["data"])
        assert recomputed["val"]["test/n"] == sizes["val"] and recomputed["test"]["test/n"] == sizes["test"]
        assert metrics["val/acc"] == pytest.approx(recomputed["val"]["test/acc"], abs=1e-6)
        assert metrics["test/acc"] == pytest.approx(recomputed["test"]["test/acc"], abs=1e-6)
        assert metrics["test/errors"] == recomputed["test"]["test/errors"]
    assert student["metrics"]["val/acc"] < student["final_metrics"]["val/acc"]  # two different sets of weights


@pytest.mark.slow
def test_multirun_with_forking_ddp_runs_each_job_once(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # ddp_fork: ddp_spawn's launcher, without re-importing kd in every worker of every
    # fit/validate/test (minutes per job on a small CPU machine). The first epoch is selected, as
    # in the test above: the workers restored it, the main process must save it.
    code, out = kd_train(tmp_path, "-m", "seed=0,1", *SHORT, "trainer.strategy=ddp_fork",
                         "callbacks.model_checkpoint.mode=min", "callbacks.model_checkpoint.save_top_k=-1",
                         f"teacher.store_dir={tmp_path / 'store'}", f"hydra.sweep.dir={sweep}")
    assert code == 0, out[-3000:]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert sorted(str(p.relative_to(sweep)) for p in sweep.rglob(RESULTS_FILE)) == ["0/results.json", "1/results.json"]
    assert not any((tmp_path / "cwd").iterdir()) and not (tmp_path / "outputs").exists()
    runs = [json.loads((sweep / job / RESULTS_FILE).read_text()) for job in ("0", "1")]
    assert [r["seed"] for r in runs] == [0, 1] and [r["overrides"][0] for r in runs] == ["seed=0", "seed=1"]
    assert [r["teacher"]["source"] for r in runs] == ["trained", "store"]
    assert runs[0]["student"]["final_metrics"] != runs[1]["student"]["final_metrics"]
    for job, results in zip(("0", "1"), runs):
        student = results["student"]
        assert student["epochs"] == 2 and student["best_epoch"] == 0
        assert {str(p.relative_to(sweep / job)) for p in (sweep / job).rglob("*.ckpt")} == {
            "checkpoints/epoch000-step10.ckpt", "checkpoints/epoch001-step20.ckpt", "checkpoints/last.ckpt"}
        with open(sweep / job / "csv" / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["epoch"]) for r in rows if r["train/loss"]] == [0, 1]
        recomputed = full_split_accuracy(sweep / job / STUDENT_WEIGHTS, results["config"]["data"])
        assert student["metrics"]["val/acc"] == pytest.approx(recomputed["val"]["test/acc"], abs=1e-6)
        assert student["metrics"]["test/acc"] == pytest.approx(recomputed["test"]["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_a_missing_teacher_is_trained_once_before_the_ranks_start_then_reused(tmp_path: Path) -> None:
    store = tmp_path / "store"
    short = (*SHORT, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "report.enabled=false",
             f"teacher.store_dir={store}")
    code, out = kd_train(tmp_path, "-v", *short, f"hydra.run.dir={tmp_path / 'first'}")  # -v: the ranks' lines
    assert code == 0, out[-3000:]
    first = json.loads((tmp_path / "first" / RESULTS_FILE).read_text())["teacher"]
    assert first["source"] == "trained"
    key = first["key"]
    assert sorted(p.name for p in store.iterdir()) == [key, f"{key}.lock"]  # no .tmp-<pid> left over
    # trained by the main process before the ranks started; rank 1 found it stored
    assert out.index(f"stored teacher {store / key}") < out.index(f"GLOBAL_RANK: 0, MEMBER: 1/{WORLD_SIZE}")
    assert out.count("training it now") == 1
    rank1_log = (tmp_path / "first" / "train_ddp_process_1.log").read_text()
    assert f"reusing stored teacher {store / key}" in rank1_log and "training it now" not in rank1_log
    stored = {name: (store / key / name).read_bytes() for name in ("meta.json", "teacher.pt")}

    code, out = kd_train(tmp_path, *short, f"hydra.run.dir={tmp_path / 'second'}")
    assert code == 0, out[-3000:]
    second = json.loads((tmp_path / "second" / RESULTS_FILE).read_text())["teacher"]
    assert second["source"] == "store" and second["key"] == key and second["metrics"] == first["metrics"]
    assert "training it now" not in out
    assert sorted(p.name for p in store.iterdir()) == [key, f"{key}.lock"]
    assert {name: (store / key / name).read_bytes() for name in stored} == stored


def test_csv_logger_copied_into_each_worker_keeps_one_whole_metrics_file(tmp_path: Path) -> None:
    # Under ddp_spawn, fit, validate and test each run in new workers with a copy of the main
    # process's logger, which never wrote; they add to one metrics.csv one after the other.
    logger = CSVLogger(str(tmp_path), name="csv", version="")
    logger.log_hyperparams({"seed": 0})  # the main process (kd.training.loggers.start_loggers)
    copies = pickle.dumps(logger)
    fit, validate = pickle.loads(copies), pickle.loads(copies)
    fit.log_metrics({"train/loss": 2.0, "val/acc": 0.5}, step=9)
    fit.save()
    validate.log_metrics({"val/acc": 0.75, "val/loss": 1.0}, step=0)
    validate.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"step": "9", "train/loss": "2.0", "val/acc": "0.5", "val/loss": ""},
        {"step": "0", "train/loss": "", "val/acc": "0.75", "val/loss": "1.0"},
    ]


@pytest.mark.slow
def test_ddp_trains_peers_together_and_scores_each_on_the_whole_split(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, out = kd_train(tmp_path, *SHORT, "trainer.max_epochs=1", "distill=dml", "report.enabled=false",
                         f"hydra.run.dir={run_dir}")
    assert code == 0, out[-3000:]
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    peer = results["peers"]["peer"]
    assert results["world_size"] == 2 and peer["selected"] == "best_val" and results["ensemble"]["metrics"]
    # each network's metrics, gathered over the ranks, are those of its own weights on the whole split
    for metrics, weights in ((results["student"]["metrics"], run_dir / STUDENT_WEIGHTS),
                             (peer["metrics"], run_dir / "peers" / "peer" / STUDENT_WEIGHTS)):
        recomputed = full_split_accuracy(weights, results["config"]["data"])
        assert recomputed["test"]["test/n"] == 360
        assert metrics["val/acc"] == pytest.approx(recomputed["val"]["test/acc"], abs=1e-6)
        assert metrics["test/errors"] == recomputed["test"]["test/errors"]
    assert not (run_dir / "train_ddp_process_1.log").read_text().count("Traceback")
