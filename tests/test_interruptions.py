"""Nothing misrecorded, nothing lost: a resume with other settings, SIGTERM, a kill during the report,
a diverging run's checkpoints. Each run is a real ``kd-train`` process where a signal is the point.

(A checkpoint whose bytes changed on disk is in ``test_resume.py``, beside the truncated one.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from faults import REPO, kd_train

from kd.results import FAILURE_FILE, RESULTS_FILE, STUDENT_WEIGHTS

RUN = ("trainer.max_epochs=3", "checkpoint.every_n_train_steps=5", "trainer.enable_progress_bar=false",
       "teacher.recipe.max_epochs=1", "+teacher.recipe.trainer.limit_train_batches=4")


def kill_at(step: int, marker: Path) -> tuple[str, ...]:
    return ("+callbacks.fault._target_=tests.faults.KillAt", f"+callbacks.fault.step={step}",
            f"+callbacks.fault.marker={marker}")


def test_a_resume_with_other_settings_is_refused_naming_them_and_the_first_record_is_kept(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = (*RUN, "report.enabled=false", "scheduler=none", f"hydra.run.dir={run}", *kill_at(12, tmp_path / "killed"))
    code, out = kd_train(tmp_path, *args)
    assert code == -9, out
    first = (run / ".hydra" / "overrides.yaml").read_text()
    config = (run / ".hydra" / "config.yaml").read_text()

    code, out = kd_train(tmp_path, *args, "resume=auto", "optimizer.lr=0.1", "distill.temperature=8")
    assert code == 2, out
    errors = [ln for ln in out.splitlines() if ln.startswith("kd-train: error:")]
    assert errors == [
        f"kd-train: error: resume: {run / 'checkpoints' / 'resume-step10.ckpt'} was written by a run with other "
        "settings: distill.temperature=4.0 (now 8), optimizer.lr=0.01 (now 0.1); resume with the settings the run "
        "started with, or start a new run in a new directory (only paths, logger, report and trainer.max_epochs may "
        "change on resume)"], out
    assert not (run / RESULTS_FILE).exists()
    assert (run / ".hydra" / "overrides.yaml").read_text() == first  # the original record, not the refused one
    assert (run / ".hydra" / "config.yaml").read_text() == config
    assert "optimizer.lr=0.1" in (run / ".hydra" / "attempts" / "2" / "overrides.yaml").read_text()

    # trainer.max_epochs may change: the run trains to the new end, and both values are recorded
    code, out = kd_train(tmp_path, *args, "resume=auto", "trainer.max_epochs=4")
    assert code == 0, out
    results = json.loads((run / RESULTS_FILE).read_text())
    assert results["overrides"] == [a for a in args if not a.startswith("hydra.run.dir=")]
    (resumed,) = results["resumes"]
    assert resumed["checkpoint"] == str(run / "checkpoints" / "resume-step10.ckpt") and resumed["step"] == 10
    assert resumed["changed"] == {"resume": [None, "auto"], "trainer.max_epochs": [3, 4]}
    assert "trainer.max_epochs=4" in resumed["overrides"]
    assert results["student"]["epochs"] == 4 and results["config"]["trainer"]["max_epochs"] == 4
    assert (run / ".hydra" / "overrides.yaml").read_text() == first
    assert sorted(p.name for p in (run / ".hydra" / "attempts").iterdir()) == ["1", "2", "3"]


def test_sigterm_exits_143_saying_so_and_the_run_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("trainer.max_epochs=40", *RUN[1:], "report.enabled=false", f"hydra.run.dir={run}")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("SLURM_", "PL_"))}
    env.update(KD_OUTPUT_ROOT=str(tmp_path / "outputs"), PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("kd-train")), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while not list((run / "checkpoints").glob("resume-step*.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 143, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("kd-train: terminated")]
    assert line.startswith("kd-train: terminated by SIGTERM after step ") and "the same command with resume=auto " \
        f"continues from {run / 'checkpoints'}" in line, line
    failure = json.loads((run / FAILURE_FILE).read_text())
    assert failure["error"] == "Terminated: " + line.removeprefix("kd-train: ")
    assert not (run / RESULTS_FILE).exists()

    code, out = kd_train(tmp_path, *args, "resume=auto")
    assert code == 0, out
    assert json.loads((run / RESULTS_FILE).read_text())["student"]["epochs"] == 40
    assert not (run / FAILURE_FILE).exists()


def test_a_kill_during_the_report_leaves_a_run_that_resumes_and_finishes_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = (*RUN, f"hydra.run.dir={run}", "+callbacks.fault._target_=tests.faults.KillInReport",
            f"+callbacks.fault.marker={tmp_path / 'killed'}")
    code, out = kd_train(tmp_path, *args)
    assert code == -9 and (tmp_path / "killed").exists(), out
    assert (run / STUDENT_WEIGHTS).exists() and not (run / RESULTS_FILE).exists()  # "completed" comes last
    assert not (run / "student.pt2").exists()

    code, out = kd_train(tmp_path, *args, "resume=auto")
    assert code == 0, out
    results = json.loads((run / RESULTS_FILE).read_text())
    assert results["status"] == "completed" and "error" not in results["report"]
    student = [r for r in results["report"]["rows"] if r["name"] == "student"]
    assert [r["params"] for r in student] == [results["student"]["params"]]
    assert results["report"]["artifacts"] == {"program": str(run / "student.pt2"), "onnx": str(run / "student.onnx")}
    assert (run / "student.pt2").is_file() and (run / "student.onnx").is_file()
    assert results["student"]["epochs"] == 3


def test_a_diverged_runs_last_good_checkpoint_holds_finite_weights(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = cli(*RUN, "report.enabled=false", "checkpoint.every_n_train_steps=1", "optimizer.lr=1e6",
               f"teacher.store_dir={tmp_path / 'store'}", f"hydra.run.dir={run}")
    assert code == 1
    results = json.loads((run / RESULTS_FILE).read_text())
    assert results["status"] == "failed"
    states = {p: torch.load(p, weights_only=True)["state_dict"] for p in (run / "checkpoints").glob("*.ckpt")}
    finite = {p for p, s in states.items() if all(torch.isfinite(t).all() for t in s.values() if t.is_floating_point())}
    assert set(states) - finite, "the run wrote no checkpoint with NaN weights: the test shows nothing"
    good = results["last_good_checkpoint"]
    assert (Path(good) in finite) if good else not finite


def test_a_checkpoint_resumed_in_another_directory_keeps_its_settings_not_its_paths(tmp_path: Path) -> None:
    from kd.errors import ConfigError
    from kd.training.checkpoints import resume_changes

    def config(root: str, lr: float) -> dict:
        return {"trainer": {"default_root_dir": root, "max_epochs": 3},
                "callbacks": {"model_checkpoint": {"dirpath": f"{root}/checkpoints"}},
                "data": {"root": "/data/cifar"}, "optimizer": {"lr": lr}}

    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    changed = resume_changes(ckpt, config("/runs/a", 0.1), config("/runs/b", 0.1))
    assert changed == {"trainer.default_root_dir": ["/runs/a", "/runs/b"]}
    saved = config("/runs/a", 0.1)
    saved["data"]["root"] = "/runs/a-data"  # a prefix of the run dir's name is not under it
    try:
        resume_changes(ckpt, saved, config("/runs/b", 0.2))
    except ConfigError as e:
        assert "data.root='/runs/a-data' (now '/data/cifar'), optimizer.lr=0.1 (now 0.2)" in str(e)
        assert "callbacks.model_checkpoint.dirpath" not in str(e)
    else:
        raise AssertionError("a changed lr was accepted")


def test_each_sweep_job_resumed_keeps_the_record_of_its_first_start(tmp_path: Path) -> None:
    from kd.results import keep_first_hydra_record, save_first_hydra_record

    def start(job: Path, overrides: str) -> None:  # what Hydra does at each start, around KeepFirstRecord
        save_first_hydra_record(job, job / ".hydra")
        (job / ".hydra").mkdir(parents=True, exist_ok=True)
        (job / ".hydra" / "overrides.yaml").write_text(overrides)
        keep_first_hydra_record(job, job / ".hydra")

    trained, refused = tmp_path / "0", tmp_path / "1"
    start(trained, "- seed=0\n")
    start(refused, "- seed=1\n")
    assert not (trained / ".hydra" / "attempts").exists()  # a first start keeps no copies
    (trained / "checkpoints").mkdir()
    (trained / "checkpoints" / "last.ckpt").write_bytes(b"x")
    start(trained, "- seed=0\n- resume=auto\n")
    start(refused, "- seed=1\n- resume=auto\n")  # no checkpoint: this start is the first
    assert (trained / ".hydra" / "overrides.yaml").read_text() == "- seed=0\n"
    assert (trained / ".hydra" / "attempts" / "2" / "overrides.yaml").read_text() == "- seed=0\n- resume=auto\n"
    assert (refused / ".hydra" / "overrides.yaml").read_text() == "- seed=1\n- resume=auto\n"
    assert not (refused / ".hydra" / "attempts").exists()
