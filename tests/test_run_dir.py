"""The state of a run directory, decided in one place (``kd.results.run_dir_state``), and the run record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.errors import ConfigError
from kd.results import FAILURE_FILE, RESULTS_FILE, RunRecord, run_dir_state


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_empty_or_missing_directory_is_new(tmp_path: Path) -> None:
    for d in (tmp_path, tmp_path / "missing"):
        state = run_dir_state(d)
        assert (state.status, state.finished, state.resumable, state.refusal("k")) == ("new", False, False, None)


def test_a_started_run_is_incomplete_and_resumable_once_it_has_checkpoints(tmp_path: Path) -> None:
    _write(tmp_path / ".hydra" / "overrides.yaml", "- distill=kd\n- seed=1\n")
    state = run_dir_state(tmp_path)
    assert (state.status, state.overrides, state.resumable) == ("incomplete", ["distill=kd", "seed=1"], False)
    _write(tmp_path / "checkpoints" / "resume-step5.ckpt", "")
    state = run_dir_state(tmp_path)
    assert state.status == "incomplete" and state.resumable and state.refusal("k") is None


def test_a_completed_run_is_finished_and_refused(tmp_path: Path) -> None:
    _write(tmp_path / ".hydra" / "overrides.yaml", "- seed=1\n")
    _write(tmp_path / "checkpoints" / "last.ckpt", "")
    _write(tmp_path / RESULTS_FILE, json.dumps({"status": "completed", "overrides": ["seed=2"], "student": {}}))
    state = run_dir_state(tmp_path)
    assert state.status == "completed" and state.finished and not state.resumable
    assert state.overrides == ["seed=2"] and state.results["student"] == {}
    refused = state.refusal("hydra.run.dir")
    assert isinstance(refused, ConfigError) and str(refused) == (
        f"hydra.run.dir: {tmp_path} already holds the results.json of another run; give the run a new directory "
        "(hydra.run.dir=...)")


def test_a_diverged_run_is_failed_finished_and_refused_with_its_error(tmp_path: Path) -> None:
    _write(tmp_path / RESULTS_FILE, json.dumps({"status": "failed", "error": "train/loss_kd is nan at step 9"}))
    state = run_dir_state(tmp_path)
    assert (state.status, state.error, state.finished) == ("failed", "train/loss_kd is nan at step 9", True)
    assert "holds a run that failed (train/loss_kd is nan at step 9); resuming it would fail" in str(state.refusal("k"))


@pytest.mark.parametrize(("text", "error"), [
    ("{not json", "unreadable results.json"),
    ("[1, 2]", "unreadable results.json: holds a list, not an object"),
    ('{"earlier": true}', "results.json has status None"),
])
def test_an_unreadable_or_foreign_results_json_is_failed_and_never_reused(tmp_path: Path, text: str, error: str) -> None:
    _write(tmp_path / RESULTS_FILE, text)
    state = run_dir_state(tmp_path)
    assert state.status == "failed" and state.error.startswith(error) and state.finished
    assert "already holds the results.json of another run" in str(state.refusal("k"))


def test_a_run_that_raised_is_failed_but_may_run_again_in_its_directory(tmp_path: Path) -> None:
    record = RunRecord(tmp_path, ["distill.temperature=-1"], method="KDLoss", seed=0)
    try:
        raise ConfigError("distill.temperature", "must be > 0\nsecond line")
    except ConfigError as e:
        assert record.write_failure(e) == tmp_path / FAILURE_FILE
    saved = json.loads((tmp_path / FAILURE_FILE).read_text())
    assert saved["error"] == "ConfigError: distill.temperature: must be > 0" and saved["status"] == "failed"
    assert saved["overrides"] == ["distill.temperature=-1"] and "Traceback" in saved["traceback"]
    state = run_dir_state(tmp_path)
    assert (state.status, state.error, state.overrides) == ("failed", saved["error"], ["distill.temperature=-1"])
    assert not state.finished and state.refusal("k") is None
    record.clear_failure()
    assert run_dir_state(tmp_path).status == "new"


def test_the_record_keeps_one_header_and_adds_later_fields(tmp_path: Path) -> None:
    record = RunRecord(tmp_path, ["seed=3"], method="KDLoss", seed=3)
    first = record.write("completed", student={"params": 10})
    second = record.write("completed", report={"rows": []})
    assert list(first)[:9] == ["kd_version", "git", "status", "started_at", "wall_time_s", "run_dir", "overrides",
                               "method", "seed"]
    assert second["student"] == {"params": 10} and second["report"] == {"rows": []}
    assert json.loads((tmp_path / RESULTS_FILE).read_text()) == json.loads(json.dumps(second))
    # never a failure.json beside a results.json: the directory belongs to the recorded run
    assert record.write_failure(RuntimeError("x")) is None and not (tmp_path / FAILURE_FILE).exists()
