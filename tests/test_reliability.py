"""Determinism, the divergence guard and safe loading, each on real ``kd-train`` runs (in this process)."""

from __future__ import annotations

import fractions
import json
import math
from pathlib import Path

import pytest
import torch

from kd.results import FAILURE_FILE, RESULTS_FILE, STUDENT_WEIGHTS
from kd.sweeps.runs import find_runs

REPO = Path(__file__).resolve().parents[1]
SHORT = (
    "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "report.enabled=false",
    "teacher.recipe.max_epochs=1", "+teacher.recipe.trainer.limit_train_batches=4",
)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_the_same_seed_gives_identical_metrics_and_weights_and_another_seed_does_not(cli, tmp_path: Path) -> None:
    # CRD draws negatives every step and keeps a memory bank: every random generator is in play
    common = (*SHORT, "distill=crd", "distill.nce_k=64", f"teacher.store_dir={tmp_path / 'store'}")
    runs = {name: (*common, f"seed={seed}", f"hydra.run.dir={tmp_path / name}")
            for name, seed in (("a", 3), ("b", 3), ("c", 4))}
    for args in runs.values():
        assert cli(*args) == 0
    a, b, c = (json.loads((tmp_path / n / RESULTS_FILE).read_text())["student"] for n in "abc")
    for part in ("metrics", "final_metrics", "best_epoch"):
        assert a[part] == b[part], part
    wa, wb, wc = (weights(tmp_path / n / STUDENT_WEIGHTS) for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["final_metrics"] != c["final_metrics"]  # the seed does reach the run: the test can fail
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_a_nan_loss_term_stops_the_run_naming_it_keeps_the_last_good_checkpoint_and_marks_it_failed(
    cli, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # tests.faults, for the config to name
    step = 9  # between the step checkpoints 4 and 8 of every_n_train_steps=4, in epoch 0
    code = cli( *SHORT, "distill=kd", "checkpoint.every_n_train_steps=4", f"teacher.store_dir={tmp_path / 'store'}",
        f"hydra.run.dir={tmp_path / 'run'}", "+callbacks.fault._target_=tests.faults.NaNAt",
        f"+callbacks.fault.step={step}", "+callbacks.fault.term=kd",
    )
    out = capsys.readouterr().err
    assert code == 1, out
    lines = [ln for ln in out.splitlines() if ln.startswith("kd-train: diverged:")]
    assert lines == [f"kd-train: diverged: train/loss_kd is nan at step {step} (epoch 0, batch {step}); training stopped "
                     "and no checkpoint holds weights from that step on. Lower the learning rate or the loss weights, or "
                     "clip gradients (trainer.gradient_clip_val)"], out
    run = tmp_path / "run"
    results = json.loads((run / RESULTS_FILE).read_text())
    assert results["status"] == "failed" and results["error"] == lines[0].removeprefix("kd-train: diverged: ")
    assert results["diverged"] == {"term": "train/loss_kd", "value": "nan", "step": step, "epoch": 0, "batch": step}
    assert not (run / STUDENT_WEIGHTS).exists() and not (run / FAILURE_FILE).exists()

    # the last good checkpoint: the newest one, written before the NaN, every weight finite
    good = Path(results["last_good_checkpoint"])
    assert good == run / "checkpoints" / "resume-step8.ckpt"
    state = torch.load(good, weights_only=True)
    assert state["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    # the guard reads its device-side record every 16 steps and before each checkpoint: step 12's
    # checkpoint (weights after the NaN) was refused, none after step 8 exists, every one is finite
    saved = {p.name: torch.load(p, weights_only=True) for p in (run / "checkpoints").glob("*.ckpt")}
    assert max(c["global_step"] for c in saved.values()) == 8, sorted(saved)
    assert all(torch.isfinite(v).all() for c in saved.values() for v in c["state_dict"].values() if v.is_floating_point())

    # kd-table lists it as failed, with the reason
    (found,) = find_runs([run])
    assert found.status == "failed" and found.error == results["error"]
    # and the directory is not reused by mistake: the same run again is refused, the record kept
    code = cli(*SHORT, "distill=kd", f"teacher.store_dir={tmp_path / 'store'}", f"hydra.run.dir={run}")
    out = capsys.readouterr().err
    assert code == 2 and "holds a run that failed (train/loss_kd is nan at step 9" in out, out
    assert json.loads((run / RESULTS_FILE).read_text()) == results


def test_a_checkpoint_that_needs_pickle_is_refused_by_default_and_loads_with_the_opt_in(
    cli, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert cli(*SHORT, "trainer.max_epochs=1", f"teacher.store_dir={store}", f"hydra.run.dir={tmp_path / 'first'}") == 0
    (stored,) = store.glob("*/teacher.pt")
    # a teacher shared with its hyperparameters pickled next to the weights, as many training scripts do
    pickled = tmp_path / "teacher_with_hparams.pt"
    torch.save({"state_dict": weights(stored), "hparams": {"lr": fractions.Fraction(1, 10)}}, pickled)

    args = (*SHORT, "trainer.max_epochs=1", f"teacher.ckpt={pickled}")
    capsys.readouterr()
    code = cli(*args, f"hydra.run.dir={tmp_path / 'refused'}")
    out = capsys.readouterr().err
    assert code == 2, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("kd-train: error:")]
    assert line == (f"kd-train: error: teacher.ckpt: {pickled} holds more than weights (a pickled fractions.Fraction); "
                    "loading it runs arbitrary code from the file (pickle); if you trust its source, set "
                    "checkpoint.allow_pickle=true")
    assert not (tmp_path / "refused" / "checkpoints").exists()  # refused before any training

    assert cli(*args, "checkpoint.allow_pickle=true", f"hydra.run.dir={tmp_path / 'allowed'}") == 0
    first = json.loads((tmp_path / "first" / RESULTS_FILE).read_text())["teacher"]
    allowed = json.loads((tmp_path / "allowed" / RESULTS_FILE).read_text())["teacher"]
    assert allowed["source"] == "checkpoint"
    assert math.isclose(allowed["metrics"]["test/acc"], first["metrics"]["test/acc"])  # the same weights
