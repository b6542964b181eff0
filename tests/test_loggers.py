"""Loggers: W&B offline by default and never hanging without network; CSV and TensorBoard files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kd.loggers import wandb_logger, wandb_reachable
from kd.run import run


def test_wandb_offline_run_lands_in_the_run_directory(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    results = run(make_cfg("logger=wandb", "distill=none"))
    assert results["status"] == "completed"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_online_wandb_without_a_server_falls_back_to_offline_fast(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_reachable(timeout=2.0)
    start = time.monotonic()
    logger = wandb_logger(save_dir=str(tmp_path), offline=False, connect_timeout=2.0)
    assert time.monotonic() - start < 5
    assert logger._offline
    assert "unreachable" in caplog.text


@pytest.mark.parametrize(("option", "pattern"), [("csv", "csv/metrics.csv"), ("tensorboard", "tensorboard/events.out.tfevents.*")])
def test_file_loggers_write_their_files(make_cfg, tmp_path: Path, option: str, pattern: str) -> None:
    run(make_cfg(f"logger={option}", "distill=none"))
    assert list((tmp_path / "run").glob(pattern))
