"""Chains of runs (kd.training.chain): Born-Again generations and teacher assistants, resumable link by link."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from faults import kd_train

from kd.errors import ConfigError, Diverged
from kd.results import RESULTS_FILE, STUDENT_WEIGHTS
from kd.training.chain import chain_links
from kd.training.run import run

TINY = "digits_cnn_tiny"
# teacher (digits_cnn) -> a -> b -> the run's student; link a trains 1 epoch of 3 steps, b and the run 2 epochs
CHAIN = (f"+model/student@chain.links.a.model={TINY}", f"+model/student@chain.links.b.model={TINY}",
         "+chain.links.a.overrides.trainer.max_epochs=1", f"model/student={TINY}", "trainer.max_epochs=2",
         "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
         "checkpoint.every_n_train_steps=2", "teacher.recipe.max_epochs=1", "+teacher.recipe.trainer.limit_train_batches=2",
         "report.enabled=false", "trainer.enable_progress_bar=false")


def test_a_chain_killed_in_its_second_link_resumes_there_and_reuses_the_first(cli, tmp_path: Path) -> None:
    # the whole chain, never interrupted, for reference
    assert cli(*CHAIN, f"teacher.store_dir={tmp_path / 'whole_store'}", f"hydra.run.dir={tmp_path / 'whole'}") == 0
    whole = json.loads((tmp_path / "whole" / RESULTS_FILE).read_text())
    store = tmp_path / "store"
    killed = (*CHAIN, f"teacher.store_dir={store}", "+callbacks.fault._target_=tests.faults.KillAt",
              "+callbacks.fault.step=4", f"+callbacks.fault.marker={tmp_path / 'killed'}")
    code, out = kd_train(tmp_path, *killed)
    assert code == -9 and "killed after step 4, epoch 1" in (tmp_path / "killed").read_text(), out  # link b, epoch 1
    (a_dir,) = [p for p in (store / "links").iterdir() if (p / RESULTS_FILE).is_file()]
    a_weights = (a_dir / STUDENT_WEIGHTS).stat().st_mtime_ns
    code, out = kd_train(tmp_path, *killed)
    assert code == 0, out
    assert f"chain link a: reusing {a_dir}" in out and "chain link b: resuming" in out
    assert (a_dir / STUDENT_WEIGHTS).stat().st_mtime_ns == a_weights  # not trained again
    (run_dir,) = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if (p / RESULTS_FILE).is_file()]
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    links = results["chain"]["links"]
    assert [(link["name"], link["reused"]) for link in links] == [("a", True), ("b", False)]
    assert links[1]["teacher"] == str(a_dir / STUDENT_WEIGHTS) and results["teacher"]["path"] == links[1]["student"]["weights"]
    # link by link, the same weights and metrics as the chain that was never killed (whose keys differ: the
    # fault callback is part of its links' configs)
    for mine, theirs in zip(links, whole["chain"]["links"]):
        assert mine["student"]["metrics"] == theirs["student"]["metrics"]
        a, b = (torch.load(x["student"]["weights"], weights_only=True) for x in (mine, theirs))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert results["student"]["metrics"] == whole["student"]["metrics"]
    assert results["chain"]["ensemble"] == whole["chain"]["ensemble"]


def test_born_again_generations_each_taught_by_the_one_before(make_cfg, tmp_path: Path) -> None:
    ban = ("+chain.generations=3", "model/teacher=digits_cnn", "model/student=digits_cnn")
    results = run(make_cfg(*ban, f"teacher.store_dir={tmp_path / 'store'}"))
    links = results["chain"]["links"]
    assert [link["name"] for link in links] == ["gen1", "gen2"] and not any(link["reused"] for link in links)
    # generation k + 1 learns from generation k's student; generation 1 from the teacher (generation 0)
    assert Path(links[0]["teacher"]).name == "teacher.pt" and Path(links[0]["teacher"]).parent.parent == tmp_path / "store"
    assert links[1]["teacher"] == links[0]["student"]["weights"] and results["teacher"]["path"] == links[1]["student"]["weights"]
    assert results["teacher"]["source"] == "checkpoint"
    ensemble = results["chain"]["ensemble"]
    assert ensemble["params"] == 3 * results["student"]["params"] and 0 <= ensemble["test/acc"] <= 1
    written = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert written["chain"] == json.loads(json.dumps(results["chain"]))


def test_chains_of_a_sweep_that_begin_alike_share_their_links(make_cfg, tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="kd.training.chain")
    takd = (f"+model/student@chain.links.assistant.model={TINY}", f"teacher.store_dir={tmp_path / 'store'}")
    first = run(make_cfg(*takd, f"model/student={TINY}", run_dir="tiny"))
    second = run(make_cfg(*takd, "model/student=digits_cnn", run_dir="big"))  # another student after the same assistant
    assert [link["reused"] for link in first["chain"]["links"]] == [False]
    assert [link["reused"] for link in second["chain"]["links"]] == [True]
    assert second["chain"]["links"][0]["key"] == first["chain"]["links"][0]["key"]
    assert "chain link assistant: reusing" in caplog.text
    # an assistant trained otherwise is another link
    third = run(make_cfg(*takd, "+chain.links.assistant.overrides.optimizer.lr=0.02", run_dir="other"))
    assert third["chain"]["links"][0]["key"] != first["chain"]["links"][0]["key"]
    assert [link["reused"] for link in third["chain"]["links"]] == [False]


def test_bad_chains_fail_before_anything_trains(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        chain_links(make_cfg("+chain.generations=1"))
    assert e.value.key == "chain.generations"
    with pytest.raises(ConfigError) as e:
        chain_links(make_cfg("+chain.links.a.overrides.trainer.max_epochs=1"))
    assert e.value.key == "chain.links.a"
    typo = make_cfg(f"+model/student@chain.links.a.model={TINY}", "+chain.links.a.overrides.trainer.max_epoch=1",
                    f"teacher.store_dir={tmp_path / 'store'}")
    with pytest.raises(ConfigError, match="trainer.max_epoch is not a key of the run's config") as e:
        run(typo)
    assert e.value.key == "chain.links.a.overrides" and not (tmp_path / "store").exists()


def test_a_link_that_diverged_is_named_when_the_chain_runs_again(make_cfg, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # tests.faults, for the config to name
    chain = (f"+model/student@chain.links.a.model={TINY}", "+callbacks.fault._target_=tests.faults.NaNAt",
             "+callbacks.fault.step=0", "+callbacks.fault.term=kd", f"teacher.store_dir={tmp_path / 'store'}")
    with pytest.raises(Diverged):
        run(make_cfg(*chain))
    with pytest.raises(ConfigError, match="link a failed in .*; change its settings .*chain.links.a.overrides") as e:
        run(make_cfg(*chain, run_dir="again"))
    assert e.value.key == "chain.store_dir"
