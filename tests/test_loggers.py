"""Loggers: W&B offline unless a key and a server are there, never hanging; what a W&B run holds; CSV and TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kd.training.loggers import flat_enough, run_identity, wandb_logger, wandb_reachable
from kd.training.run import run

DUMMY_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, like a real key
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens on the discard port


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a W&B ``run-*.wandb`` file: a leveldb log of 32 KiB blocks after a
    7-byte ``:W&B`` header (the format ``wandb sync`` reads; wandb >= 0.20 reads it in Go only)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore"
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4) and chunk:  # FULL, LAST
            record = Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """The run record, config, history keys and summary of the one offline W&B run under ``run_dir``.

    Nested summary values logged piecewise (a table's fields) come back under ``a/b`` keys. W&B's
    service writes the file on its own schedule, after ``run.finish()`` returns; shutting the
    service down (as a process does at exit) is what makes the file complete."""
    import wandb

    wandb.teardown()
    (store,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: set[str] = set()
    run_record = None
    for record in wandb_records(store):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_record = record.run
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.update(item.key or "/".join(item.nested_key) for item in record.history.item)
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update})
    return {"run": run_record, "config": config, "history": history, "summary": summary}


@pytest.fixture
def no_wandb_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No W&B key, mode or server from the machine running the tests."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_wandb_offline_run_holds_config_losses_and_results(cli, tmp_path: Path, no_wandb_env) -> None:
    run_dir = tmp_path / "r"
    assert cli("logger=wandb", "debug=fdr", "distill.temperature=8", "seed=3", f"hydra.run.dir={run_dir}") == 0
    assert "no W&B API key (WANDB_API_KEY or `wandb login`): logging offline" in (run_dir / "train.log").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    stored = read_offline_run(run_dir)

    assert stored["run"].display_name == "debug=fdr,distill.temperature=8,seed=3"  # logger= is noise
    assert set(stored["run"].tags) == {"method:kd", "student:digits_cnn_tiny", "teacher:digits_cnn", "dataset:digits"}
    config = stored["config"]
    assert config["distill"]["temperature"] == 8.0 and config["model"]["student"]["channels"] == [8, 16]
    assert config["method"] == "kd" and config["seed"] == 3 and config["teacher"]["ckpt"] is None

    assert {"train/loss", "train/loss_kd", "train/loss_ce", "val/acc", "test/acc"} <= stored["history"]

    summary = stored["summary"]
    assert summary["results"]["student"]["metrics"]["test/acc"] == results["student"]["metrics"]["test/acc"]
    assert summary["results"]["report"]["rows"][0]["name"] == "student"
    assert summary["test/acc"] == results["student"]["metrics"]["test/acc"]
    assert summary["teacher/test/acc"] == results["teacher"]["metrics"]["test/acc"]
    assert summary["compression_report/_type"] == "table-file" and summary["compression_report/nrows"] == 1
    assert "WANDB_MODE" not in os.environ  # Lightning's process-wide dryrun is undone


def test_wandb_holds_each_peer_and_the_ensemble(cli, tmp_path: Path, no_wandb_env) -> None:
    run_dir = tmp_path / "r"
    assert cli("logger=wandb", "debug=fdr", "distill=dml", f"hydra.run.dir={run_dir}") == 0
    results = json.loads((run_dir / "results.json").read_text())
    stored = read_offline_run(run_dir)
    assert {"train/loss_kl", "train/loss_kl_peer", "val/peer/acc", "val/ensemble/acc", "test/peer/acc"} <= stored["history"]
    summary = stored["summary"]
    assert summary["peer/peer/test/acc"] == results["peers"]["peer"]["metrics"]["test/acc"]
    assert summary["ensemble/test/acc"] == results["ensemble"]["metrics"]["test/acc"]
    assert summary["results"]["peers"]["peer"]["weights"] == str(run_dir / "peers" / "peer" / "student.pt")


def test_wandb_with_a_key_and_no_server_starts_offline_at_once(make_cfg, tmp_path: Path, no_wandb_env, monkeypatch,
                                                               caplog) -> None:
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT)
    assert not wandb_reachable(timeout=2.0)
    start = time.monotonic()
    logger = wandb_logger(save_dir=str(tmp_path), connect_timeout=2.0)
    assert time.monotonic() - start < 3
    assert logger._offline
    assert "unreachable" in caplog.text and "offline" in caplog.text

    caplog.clear()
    start = time.monotonic()
    results = run(make_cfg("logger=wandb", "distill=none", "report.enabled=false"))
    assert results["status"] == "completed" and time.monotonic() - start < 60
    assert "unreachable" in caplog.text
    assert read_offline_run(tmp_path / "run")["summary"]["results"]["status"] == "completed"


@pytest.mark.parametrize(
    ("env", "offline", "expected", "message"),
    [
        ({}, None, True, "no W&B API key"),
        ({"WANDB_API_KEY": DUMMY_KEY, "WANDB_MODE": "offline"}, None, True, "WANDB_MODE=offline"),
        ({"WANDB_API_KEY": DUMMY_KEY}, True, True, ""),
        ({}, False, True, "unreachable"),  # asked online: no key check, but still no hang
    ],
)
def test_wandb_mode(tmp_path: Path, no_wandb_env, monkeypatch, caplog, env: dict, offline, expected: bool,
                    message: str) -> None:
    caplog.set_level(logging.INFO, logger="kd.training.loggers")
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    logger = wandb_logger(save_dir=str(tmp_path), offline=offline, connect_timeout=1.0, log_model=True)
    assert logger._offline is expected and logger._log_model is False
    assert message in caplog.text and "artifacts need an online run" in caplog.text


def test_wandb_key_from_netrc_counts(tmp_path: Path, no_wandb_env, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="kd.training.loggers")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1:9\n  login user\n  password {DUMMY_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT)
    wandb_logger(save_dir=str(tmp_path), connect_timeout=1.0)
    assert "unreachable" in caplog.text and "no W&B API key" not in caplog.text


def test_run_identity_from_overrides() -> None:
    resolved = {"seed": 1, "distill": {"_target_": "kd.losses.kd.KDLoss"}, "model": {"student": {"_target_": "kd.models.ConvNet"}}}
    overrides = ["distill=kd", "distill.temperature=4", "paths.root=/x", "hydra.run.dir=/y", "teacher.store_dir=/z",
                 "logger=wandb", "+seed=1"]
    choices = {"distill": "kd", "model/student": "resnet8", "model/teacher": "resnet32", "data": "cifar100",
               "experiment": "cifar100_kd"}
    identity = run_identity(resolved, overrides, choices)
    assert identity["name"] == "distill=kd,distill.temperature=4,seed=1"
    assert identity["group"] == "cifar100_kd"
    assert identity["tags"] == ["method:kd", "student:resnet8", "teacher:resnet32", "dataset:cifar100"]
    assert identity["keys"] == {"method": "kd", "student": "resnet8", "teacher_model": "resnet32", "dataset": "cifar100", "seed": 1}
    assert run_identity(resolved, overrides, choices, sweep="2025-01-01/12-00-00")["group"] == "2025-01-01/12-00-00"

    # outside Hydra: the overrides, else the classes the config names
    assert run_identity(resolved, ["experiment=digits_kd"])["group"] == "digits_kd"
    bare = run_identity(resolved)
    assert bare["name"] == "KDLoss-ConvNet" and bare["group"] is None and bare["tags"] == ["method:KDLoss", "student:ConvNet"]


def test_user_name_group_tags_win(make_cfg, tmp_path: Path, no_wandb_env) -> None:
    from kd.training.loggers import start_loggers

    logger = wandb_logger(save_dir=str(tmp_path), name="mine", tags=["a"])
    logger._wandb_init["mode"] = "disabled"  # logging the config starts a run: here one that writes nothing
    start_loggers([logger], {"seed": 0, "distill": {"_target_": "kd.losses.kd.KDLoss"}}, ["distill=kd", "seed=0"])
    assert logger._wandb_init["name"] == "mine" and logger._wandb_init["tags"] == ["a"]
    assert logger._wandb_init["group"] is None  # no sweep, no experiment
    logger.experiment.finish()


def test_config_lists_of_dicts_become_keyed_by_position() -> None:
    config = {"a": {"b": None, "c": [1, 2]}, "d": [{"e": 1}, [2, 3]], "f": (4,)}
    assert flat_enough(config) == {"a": {"b": None, "c": [1, 2]}, "d": {"0": {"e": 1}, "1": [2, 3]}, "f": [4]}


@pytest.mark.parametrize(("option", "pattern"), [("csv", "csv/metrics.csv"), ("tensorboard", "tensorboard/events.out.tfevents.*")])
def test_file_loggers_write_their_files(make_cfg, tmp_path: Path, option: str, pattern: str) -> None:
    run(make_cfg(f"logger={option}", "distill=none"))
    assert list((tmp_path / "run").glob(pattern))


def test_a_failed_job_closes_its_wandb_run_as_failed(cli, tmp_path: Path, no_wandb_env, monkeypatch) -> None:
    import wandb

    import kd.training.run

    def fit_that_breaks(**kwargs: Any) -> None:
        assert wandb.run is not None  # the config is logged before training
        raise RuntimeError("boom")

    monkeypatch.setattr(kd.training.run, "fit", fit_that_breaks)
    run_dir = tmp_path / "r"
    assert cli("logger=wandb", "distill=none", f"hydra.run.dir={run_dir}") == 1  # Hydra prints the error
    assert wandb.run is None  # the next job of a sweep starts its own run
    wandb.teardown()  # the service completes the file (see read_offline_run)
    exits = [r.exit.exit_code for r in wandb_records(next(run_dir.glob("wandb/offline-run-*/run-*.wandb")))
             if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    assert (run_dir / "failure.json").exists()


def test_a_resume_continues_the_csv_history_and_the_wandb_run(tmp_path: Path, no_wandb_env) -> None:
    from kd.training.loggers import CSVLogger, continue_history

    csv_logger = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    (tmp_path / "csv").mkdir()
    rows = ["epoch,step,train/loss,val/acc", "0,18,,0.5", "0,18,0.25,", "1,37,,0.6", "1,37,0.21,", "2,56,,0.7"]
    (tmp_path / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    for name in ("offline-run-20261204_101010-aaa111", "offline-run-20261204_111111-bbb222",
                 "offline-run-20261204_111111-bbb222-1", "run-20261203_235959-ccc333", "latest-run"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    wandb = wandb_logger(save_dir=str(tmp_path), offline=True)
    given = wandb_logger(save_dir=str(tmp_path), offline=True, id="mine")

    continue_history([csv_logger, wandb, given], tmp_path, step=39)  # resumed inside epoch 2: its row goes
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == rows[:5]
    assert wandb._wandb_init["id"] == "bbb222" and wandb._wandb_init["resume"] == "allow"  # the newest run
    assert given._wandb_init["id"] == "mine"  # logger.wandb.id given: kept
    csv_logger.log_metrics({"train/loss": 0.2, "epoch": 2}, step=56)  # the writer adds to the kept rows
    csv_logger.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == [*rows[:5], "2,56,0.2,"]
