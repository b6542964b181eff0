"""Exact resume: a run SIGKILLed mid-epoch and restarted with the same command ends where an uninterrupted run ends.

Each faulty run is a real ``kd-train`` process; the reference run, never interrupted, runs in this
process (the same code; its equality with the subprocess runs is part of what is shown). The faulty one is
killed right after a random optimizer step in the middle of an epoch (``tests.faults.KillAt``),
between two step checkpoints, then run again with the same command plus ``resume=auto``, which
finds the run's directory and its newest checkpoint. Final and best-validation metrics must be
equal and the student's weights equal bit for bit (CPU). For KD the newest checkpoint is first cut
in half, for CRD 64 bytes inside one of its tensors are flipped (a bad sector: the file still
loads): named explicitly it is refused on one line, and ``resume=auto`` falls back to the one
before it, and still ends where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from datagen import write_cifar
from faults import flip_bytes, kd_train
from omegaconf import OmegaConf

from kd.models.weights import CorruptCheckpoint
from kd.results import RESULTS_FILE, STUDENT_WEIGHTS
from kd.training.prepare import resume_checkpoint

EVERY = 4  # checkpoint.every_n_train_steps
EPOCHS = 3
RUN = (
    f"trainer.max_epochs={EPOCHS}", f"checkpoint.every_n_train_steps={EVERY}", "trainer.enable_progress_bar=false",
    "teacher.recipe.max_epochs=1", "+teacher.recipe.trainer.limit_train_batches=4", "report.enabled=false",
)
METHODS = {
    "kd": ("distill=kd",),
    "crd": ("distill=crd", "distill.nce_k=64"),  # a memory bank and negatives drawn every step
    "prune": ("distill=kd", "callbacks=prune_agp"),  # masks that change every few steps
    "cskd": ("distill=cskd",),  # same-class partners drawn from the data order's seeds
    "dml": ("distill=dml",),  # two networks, each with its own best checkpoint
    "mlkd_two_views": ("distill=mlkd", "distill.views=2", "data=cifar10", "data.val_size=40",
                       "data.batch_size=16"),  # a strong view drawn from the data order's seeds (on CIFAR files)
}


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(cli, tmp_path: Path, method: str) -> None:
    common = (*RUN, *METHODS[method], f"teacher.store_dir={tmp_path / 'store'}")
    if "data=cifar10" in common:
        common += (f"data.root={write_cifar(tmp_path / 'data', 'cifar10', n_train=200, n_test=20)}",)
    assert cli(*common, f"hydra.run.dir={tmp_path / 'whole'}") == 0  # in this process: it is not killed
    whole = json.loads((tmp_path / "whole" / RESULTS_FILE).read_text())
    total = max(torch.load(p, weights_only=True, mmap=True)["global_step"]  # last.ckpt is the last best one
                for p in (tmp_path / "whole" / "checkpoints").glob("*.ckpt"))
    per_epoch = total // EPOCHS
    # a step inside epoch 1 that is not a checkpoint step: the resumed run redoes the steps since the last one;
    # for kd the newest checkpoint is then cut short, for crd some of its bytes flipped, and the one before
    # it (mid-epoch 1 too) must do
    truncate, flip = method == "kd", method == "crd"
    kill = random.Random(method).choice([
        s for s in range(per_epoch + 2, 2 * per_epoch - 1)
        if s % EVERY and (not (truncate or flip) or s - s % EVERY - EVERY > per_epoch)
    ])
    faulty = (*common, "+callbacks.fault._target_=tests.faults.KillAt", f"+callbacks.fault.step={kill}",
              f"+callbacks.fault.marker={tmp_path / 'killed'}")
    code, out = kd_train(tmp_path, *faulty)
    assert code == -9 and (tmp_path / "killed").exists(), out
    (run_dir,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert not (run_dir / RESULTS_FILE).exists()
    steps = sorted(torch.load(p, weights_only=True, mmap=True)["global_step"] for p in (run_dir / "checkpoints").glob("resume-*.ckpt"))
    newest = kill - kill % EVERY
    assert steps == [newest - EVERY, newest]  # the two newest step checkpoints are kept
    history = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    assert {row.split(",")[0] for row in history[1:]} == {"0"}, history  # epoch 0's rows, written before the kill
    resume_from = run_dir / "checkpoints" / f"resume-step{newest}.ckpt"
    if truncate:
        data = resume_from.read_bytes()
        resume_from.write_bytes(data[: len(data) // 2])  # a copy cut short, a full disk
        with pytest.raises(CorruptCheckpoint) as named:  # resume=<that path>: one clear line
            resume_checkpoint(OmegaConf.create({"resume": str(resume_from)}), run_dir, allow_pickle=False)
        assert str(named.value).startswith(f"resume: {resume_from} is truncated or corrupt (")
        assert str(named.value).endswith("delete it or give another checkpoint") and "\n" not in str(named.value)
        broken, resume_from = resume_from, run_dir / "checkpoints" / f"resume-step{newest - EVERY}.ckpt"
    if flip:
        record = flip_bytes(resume_from)
        torch.load(resume_from, weights_only=True)  # torch itself reads it without a word
        with pytest.raises(CorruptCheckpoint) as named:
            resume_checkpoint(OmegaConf.create({"resume": str(resume_from)}), run_dir, allow_pickle=False)
        assert str(named.value) == (f"resume: {resume_from} is corrupt: the bytes of its record {record} no longer "
                                    "match their CRC (changed on disk); delete it or give another checkpoint")
        broken, resume_from = resume_from, run_dir / "checkpoints" / f"resume-step{newest - EVERY}.ckpt"

    code, out = kd_train(tmp_path, *faulty, "resume=auto")
    assert code == 0, out
    if truncate:
        assert f"resume=auto: skipping a checkpoint that does not load: {broken} is truncated or corrupt" in out
    if flip:
        assert f"resume=auto: skipping a checkpoint that does not load: {broken} is corrupt: the bytes of its record" in out
    assert f"resume=auto: continuing from {resume_from}" in out
    assert len(list((tmp_path / "outputs" / "runs").glob("*/*"))) == 1  # the same directory, not a new one
    resumed = json.loads((run_dir / RESULTS_FILE).read_text())
    for part in ("metrics", "final_metrics", "best_epoch", "epochs", "selected"):
        assert resumed["student"][part] == whole["student"][part], part
    assert_same_weights(run_dir / STUDENT_WEIGHTS, tmp_path / "whole" / STUDENT_WEIGHTS)
    for name, peer in whole.get("peers", {}).items():
        assert resumed["peers"][name]["metrics"] == peer["metrics"] and resumed["ensemble"] == whole["ensemble"]
        assert_same_weights(run_dir / "peers" / name / STUDENT_WEIGHTS, tmp_path / "whole" / "peers" / name / STUDENT_WEIGHTS)
    # the history is continued: epoch 0 kept, epoch 1's training means over the whole epoch, not since the resume
    assert (run_dir / "csv" / "metrics.csv").read_text() == (tmp_path / "whole" / "csv" / "metrics.csv").read_text()


def test_an_interrupted_sweep_run_again_with_resume_auto_resumes_its_job_and_skips_finished_ones(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ("-m", *RUN, "trainer.max_epochs=1", "distill=kd", "seed=0,1", f"hydra.sweep.dir={sweep}",
            f"teacher.store_dir={tmp_path / 'store'}", "+callbacks.fault._target_=tests.faults.KillAt",
            "+callbacks.fault.step=6", f"+callbacks.fault.marker={tmp_path / 'killed'}")
    code, out = kd_train(tmp_path, *args)
    assert code == -9, out  # killed in job 0, before job 1 started
    assert not (sweep / "0" / RESULTS_FILE).exists() and not (sweep / "1").exists()

    code, out = kd_train(tmp_path, *args, "resume=auto")
    assert code == 0, out
    assert f"resume=auto: continuing from {sweep / '0' / 'checkpoints' / 'resume-step4.ckpt'}" in out
    assert f"resume=auto: {sweep / '1'} has no readable checkpoint; starting from scratch" in out
    finished = {n: (sweep / n / RESULTS_FILE).read_bytes() for n in "01"}
    record = sweep / "0" / ".hydra"  # the job that trained keeps its first start's record
    assert "resume=auto" not in (record / "overrides.yaml").read_text()
    assert "resume=auto" in (record / "attempts" / "2" / "overrides.yaml").read_text()
    assert not (sweep / "1" / ".hydra" / "attempts").exists()
    assert all(json.loads(f)["status"] == "completed" for f in finished.values())

    code, out = kd_train(tmp_path, *args, "resume=auto")  # once more: nothing is redone
    assert code == 0, out
    assert all(f"kd-train: resume=auto: {sweep / n} is finished; skipped" in out for n in "01"), out
    assert {n: (sweep / n / RESULTS_FILE).read_bytes() for n in "01"} == finished


def test_slurm_preemption_saves_through_lightnings_handler_and_the_requeued_job_resumes(cli, tmp_path: Path) -> None:
    common = (*RUN, "trainer.max_epochs=2", "distill=kd", f"teacher.store_dir={tmp_path / 'store'}")
    assert cli(*common, f"hydra.run.dir={tmp_path / 'whole'}") == 0
    # a SLURM job of one task, with an scontrol that records the requeue instead of doing it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "kd", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    job_dir = tmp_path / "sweep" / "0"  # submitit's requeued job runs in the same job directory
    preempt = 2 * EVERY + 3  # between step checkpoints: the newest one is older than the preemption
    args = (*common, "resume=auto", f"hydra.run.dir={job_dir}", "+callbacks.fault._target_=tests.faults.PreemptAt",
            f"+callbacks.fault.step={preempt}", f"+callbacks.fault.marker={tmp_path / 'preempted'}")
    code, out = kd_train(tmp_path, *args, env=slurm)
    assert code == -9, out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    (hpc,) = job_dir.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, weights_only=True, mmap=True)["global_step"] == preempt

    code, out = kd_train(tmp_path, *args, env=slurm)  # the requeued job: the same command
    assert code == 0, out
    assert f"resume=auto: continuing from {hpc}" in out
    # consumed, then moved out of Lightning's sight: under SLURM it would be evaluated in place of the final weights
    assert not hpc.exists() and (job_dir / "checkpoints" / f"hpc-step{preempt}-1.ckpt").is_file()
    resumed = json.loads((job_dir / RESULTS_FILE).read_text())["student"]
    whole = json.loads((tmp_path / "whole" / RESULTS_FILE).read_text())["student"]
    assert resumed["final_metrics"] == whole["final_metrics"] and resumed["metrics"] == whole["metrics"]
    assert_same_weights(job_dir / STUDENT_WEIGHTS, tmp_path / "whole" / STUDENT_WEIGHTS)
