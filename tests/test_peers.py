"""Networks that train together (model.peers): DML and KDCL, each peer evaluated, selected and saved alone."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from kd.cli.eval import evaluate_artifact
from kd.errors import ConfigError
from kd.results import RESULTS_FILE
from kd.training.prepare import prepare
from kd.training.run import run


class WatchWeights(L.Callback):
    """Records, after every training step, which of the student and its peers changed their weights."""

    def __init__(self) -> None:
        self.changed: list[dict[str, bool]] = []
        self.last: dict[str, list[torch.Tensor]] = {}

    def _now(self, module: L.LightningModule) -> dict[str, list[torch.Tensor]]:
        nets = {"student": module.student, **module.peers}
        return {name: [p.detach().clone() for p in net.parameters()] for name, net in nets.items()}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.last = self._now(module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        now = self._now(module)
        self.changed.append({n: any(not torch.equal(a, b) for a, b in zip(now[n], self.last[n])) for n in now})
        self.last = now


def test_dml_trains_both_peers_at_every_step_and_each_peer_loads_in_kd_eval(make_cfg, tmp_path: Path, monkeypatch) -> None:
    cfg = make_cfg("distill=dml", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
                   "trainer.limit_test_batches=null", "logger=csv")
    job_watch = WatchWeights()

    def with_watch(c):  # the run's own trainer, with the watcher added
        job = prepare(c)
        job.trainer.callbacks.append(job_watch)
        return job

    monkeypatch.setattr("kd.training.run.prepare", with_watch)
    results = run(cfg)
    assert job_watch.changed == [{"student": True, "peer": True}] * 8
    run_dir = tmp_path / "run"
    written = json.loads((run_dir / RESULTS_FILE).read_text())
    peer = written["peers"]["peer"]
    assert peer["params"] == written["student"]["params"] == 1_442  # DML's default: a second student of its kind
    assert written["config"]["model"]["peers"]["peer"] == written["config"]["model"]["student"]
    # each peer is selected on its own validation accuracy (val/peer/acc), in its own checkpoint
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("val/peer/acc")]
    by_epoch = {int(r["epoch"]): float(r["val/peer/acc"]) for r in rows[:2]}
    assert peer["best_epoch"] == max(by_epoch, key=lambda e: (by_epoch[e], -e))
    assert Path(peer["checkpoint"]).parent == run_dir / "checkpoints" / "peer"
    assert peer["metrics"]["val/acc"] == pytest.approx(by_epoch[peer["best_epoch"]])
    assert {"val/acc", "test/acc", "test/errors"} <= set(written["ensemble"]["metrics"])
    # every network's weights load alone in kd-eval and score what results.json says
    for weights, recorded in ((run_dir / "peers" / "peer" / "student.pt", peer), (run_dir / "student.pt", written["student"])):
        scored = evaluate_artifact(weights)
        assert scored["test/errors"] == recorded["metrics"]["test/errors"], weights
    assert results["peers"]["peer"]["weights"] == str(run_dir / "peers" / "peer" / "student.pt")


def test_kdcl_with_a_mixed_pair_records_each_network(make_cfg, tmp_path: Path) -> None:
    results = run(make_cfg("distill=kdcl", "+model/student@model.peers.big=digits_cnn"))
    assert results["peers"]["big"]["params"] == 294_986 and results["student"]["params"] == 1_442
    assert (tmp_path / "run" / "peers" / "big" / "student.pt").is_file()
    assert evaluate_artifact(tmp_path / "run" / "peers" / "big" / "student.pt")["test/acc"] == pytest.approx(
        results["peers"]["big"]["metrics"]["test/acc"], abs=1e-6)


@pytest.mark.parametrize(("overrides", "key", "message"), [
    (("distill=kd", "+model/student@model.peers.p=digits_cnn_tiny"), "model.peers", "trains one student"),
    (("distill=dml", "+model/student@model.peers.ensemble=digits_cnn_tiny"), "model.peers.ensemble", "identifier"),
])
def test_peers_and_method_must_agree_before_anything_trains(make_cfg, overrides, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        prepare(make_cfg(*overrides))
    assert e.value.key == key
