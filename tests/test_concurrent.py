"""hydra/launcher=concurrent: a sweep's runs at once on one device give what each gives alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd.cli.concurrent import SizeConcurrentRuns, common_overrides, free_device_memory, probe_peak, runs_that_fit
from kd.errors import ConfigError
from tests.faults import kd_train

GiB = 2**30
SHORT = ("trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
         "report.enabled=false", "teacher.recipe.max_epochs=1", "+teacher.recipe.trainer.limit_train_batches=4",
         "teacher_cache.enabled=true")


def _students(sweep: Path) -> dict[float, dict]:
    found = {}
    for path in sweep.glob("*/results.json"):
        results = json.loads(path.read_text())
        assert results["status"] == "completed", path
        found[results["config"]["distill"]["temperature"]] = results["student"]
    return found


def test_two_runs_at_once_give_each_the_metrics_it_gives_alone(tmp_path: Path) -> None:
    common = (*SHORT, f"teacher.store_dir={tmp_path / 'store'}", f"teacher_cache.dir={tmp_path / 'cache'}",
              "distill.temperature=2,8")
    code, out = kd_train(tmp_path, "-m", *common, f"hydra.sweep.dir={tmp_path / 'alone'}")  # one after the other
    assert code == 0, out
    # both runs start together: one trains the teacher and builds its cache under the locks, the other waits and reads
    code, out = kd_train(tmp_path, "-m", "hydra/launcher=concurrent", "hydra.launcher.n_jobs=2", *common,
                         f"hydra.sweep.dir={tmp_path / 'together'}")
    assert code == 0, out
    assert "Joblib.Parallel(n_jobs=2" in out
    alone, together = _students(tmp_path / "alone"), _students(tmp_path / "together")
    assert sorted(alone) == sorted(together) == [2.0, 8.0]
    for t in alone:
        assert together[t]["metrics"] == alone[t]["metrics"], t
        assert together[t]["final_metrics"] == alone[t]["final_metrics"], t
    assert alone[2.0]["final_metrics"] != alone[8.0]["final_metrics"]  # the runs differ: the comparison can fail
    assert len(list((tmp_path / "store").glob("*/teacher.pt"))) == 1  # one teacher, trained once
    assert len(list((tmp_path / "cache").glob("*/meta.json"))) == 1  # one cache, built once


def test_as_many_runs_start_as_fit_in_the_free_memory() -> None:
    # an H200 with 139 GiB free; one CIFAR run's peak 3 GiB + 0.6 GiB of CUDA context: 0.85 x 139 / 3.6 = 32
    assert runs_that_fit(139 * GiB, 3 * GiB, cap=64, context=int(0.6 * GiB)) == 32
    assert runs_that_fit(139 * GiB, 3 * GiB, cap=15, context=int(0.6 * GiB)) == 15  # CPU cores to feed them
    assert runs_that_fit(10 * GiB, 40 * GiB, cap=8) == 1  # never none


def test_the_probe_runs_the_sweeps_common_config() -> None:
    task = ["experiment=cifar100_resnet32x4_resnet8x4", "distill.temperature=1,2,4,8", "trainer=gpu",
            "distill=glob(*)", "seed=range(3)", "optimizer.lr=0.05"]
    assert common_overrides(task) == ["experiment=cifar100_resnet32x4_resnet8x4", "trainer=gpu", "optimizer.lr=0.05"]


def test_zero_runs_at_once_on_a_cpu_is_one_per_two_cores(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert SizeConcurrentRuns.size(make_cfg("trainer=cpu")) == 8


def test_the_probe_runs_kd_train_and_reads_its_peak_memory_or_says_there_is_none(tmp_path: Path) -> None:
    overrides = ["debug=fdr", f"paths.root={tmp_path / 'outputs'}"]
    if torch.cuda.is_available():
        assert probe_peak([*overrides, "trainer=gpu"], tmp_path / "probe") > 0
        return
    with pytest.raises(ConfigError, match=r"^hydra.launcher.n_jobs: the probe run recorded no peak device memory"):
        probe_peak(overrides, tmp_path / "probe")
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["status"] == "completed" and results["peak_memory_bytes"] is None
    assert results["config"]["trainer"]["limit_train_batches"] == 20  # the probe's steps, over debug=fdr's 1
    with pytest.raises(ConfigError, match=r"^hydra.launcher.n_jobs: 0 \(as many runs as fit\) measures one run first, "
                                          r"and that run failed \(.*distill.temprature"):
        probe_peak([*overrides, "distill.temprature=2"], tmp_path / "bad")


def test_the_free_memory_is_asked_in_a_process_of_its_own() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^hydra.launcher.n_jobs: 0 \(as many runs as fit\) reads the GPU's free "
                                              r"memory, and that failed \(.+\); give the number"):
            free_device_memory()
        return
    free, total = free_device_memory()
    assert 0 < free <= total
    assert not torch.cuda.is_initialized()  # this process holds no CUDA context for it
