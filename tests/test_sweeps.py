"""Sweeps as a user runs them: the presets of conf/hparams_search/, Optuna, a failed job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from kd.cli import config_dir

PRESETS = sorted(p.stem for p in (Path(config_dir()) / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_sweeps_keys_of_the_composed_config(preset: str) -> None:
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, preset
    for key in params:
        group = Path(config_dir()) / key
        if group.is_dir():  # a config group: every option swept must exist
            options = {p.stem for p in group.glob("*.yaml")}
            assert set(str(params[key]).split(",")) <= options, f"{preset}: unknown option in {params[key]}"
        else:  # a value of the config: it must exist, or the sweep would fail in every job
            node = cfg
            for part in key.split("."):
                assert part in node, f"{preset}: {key} is not a key of the config"
                node = node[part]


def test_optuna_study_records_the_best_parameters_of_its_runs(cli, tmp_path: Path) -> None:
    sweep = tmp_path / "study"
    code = cli("-m", "hparams_search=optuna", "debug=fdr", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
               "trainer.limit_val_batches=4", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
               f"teacher.store_dir={tmp_path / 'store'}", f"hydra.sweep.dir={sweep}")
    assert code == 0
    runs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    keys = ["distill.temperature", "distill.weight", "distill.ce_weight"]
    assert sorted(best["best_params"]) == sorted(keys)
    sampled = [{k: r["config"]["distill"][k.split(".")[1]] for k in keys} for r in runs]
    assert len({s["distill.temperature"] for s in sampled}) == 3  # the sampler varied the runs
    assert all(1.0 <= s["distill.temperature"] <= 16.0 and 0.1 <= s["distill.weight"] <= 1.0 for s in sampled)
    # the objective is the selected student's validation accuracy; the best value is the best run's
    values = [r["student"]["metrics"]["val/acc"] for r in runs]
    assert best["best_value"] == pytest.approx(max(values))
    winners = [s for s, v in zip(sampled, values) if v == pytest.approx(max(values))]
    assert any(all(best["best_params"][k] == pytest.approx(w[k]) for k in keys) for w in winners)


def test_a_failed_job_leaves_failure_json_and_the_sweep_goes_on(cli, capsys, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code = cli("-m", "distill.temperature=-1,4", "debug=fdr", f"hydra.sweep.dir={sweep}")
    assert code != 0  # Hydra reports the failed job at the end
    failure = json.loads((sweep / "0" / "failure.json").read_text())
    assert failure["status"] == "failed" and not (sweep / "0" / "results.json").exists()
    assert failure["error"] == "ConfigError: distill.temperature: must be > 0 and finite, got -1"
    assert "distill.temperature=-1" in failure["overrides"]
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "completed"
    assert not (sweep / "1" / "failure.json").exists()
    assert "kd-train: error (" in capsys.readouterr().err


def test_a_single_run_with_bad_input_records_the_failure_and_exits_2(cli, capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    assert cli("debug=fdr", "distill.temperature=-1", f"hydra.run.dir={run_dir}") == 2
    assert capsys.readouterr().err.strip() == "kd-train: error: distill.temperature: must be > 0 and finite, got -1"
    assert json.loads((run_dir / "failure.json").read_text())["overrides"][1] == "distill.temperature=-1"


def test_a_successful_rerun_in_the_same_directory_removes_the_old_failure(cli, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    assert cli("debug=fdr", "distill.temperature=-1", f"hydra.run.dir={run_dir}") == 2
    assert (run_dir / "failure.json").is_file()
    assert cli("debug=fdr", f"hydra.run.dir={run_dir}") == 0
    assert (run_dir / "results.json").is_file() and not (run_dir / "failure.json").exists()
