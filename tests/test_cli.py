"""kd-train as a user types it: help, one-line errors, a sweep."""

from __future__ import annotations

import json
from pathlib import Path


def test_help_lists_the_config_groups(cli, capsys) -> None:
    assert cli("--help") == 0
    out = capsys.readouterr().out
    assert "kd-train" in out
    for group in ("data", "distill", "model/teacher", "model/student", "trainer", "logger",
                  "callbacks", "experiment", "debug", "optimizer", "scheduler", "protocol"):
        assert f"{group}:" in out, group
    methods = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "distill").glob("*.yaml"))
    assert f"distill: {', '.join(methods)}\n" in out  # every option of distill, in order


def test_cfg_job_prints_the_composed_config(cli, capsys) -> None:
    assert cli("--cfg", "job", "distill.temperature=8") == 0
    out = capsys.readouterr().out
    assert "temperature: 8" in out and "_target_: kd.losses.kd.KDLoss" in out


def test_bad_value_is_one_line_on_stderr_with_exit_status_2(cli, capsys, tmp_path: Path) -> None:
    code = cli("debug=fdr", "distill.temperature=-1", f"hydra.run.dir={tmp_path / 'r'}")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "kd-train: error: distill.temperature: must be > 0 and finite, got -1"
    assert not (tmp_path / "r" / "results.json").exists()


def test_unknown_option_fails_with_the_list_of_options(cli, capsys) -> None:
    assert cli("distill=kdd") == 2
    assert capsys.readouterr().err.splitlines() == [
        "kd-train: error: distill=kdd: no such option in conf/distill/; did you mean kd, kdsvd, rkd? valid: ab, at, camkd, "
        "cc, crd, crd_kd, cskd, ctkd, deit, dist, dkd, dml, fitnet, fitnet_kd, fsp, ft, kd, kd_imagenet, kd_ls, kdcl, "
        "kdsvd, mlkd, none, nst, ofd, pkt, reviewkd, rkd, sp, tfkd_reg, ... (31 in all)"]  # the first 30


def test_unknown_keys_and_unparsable_overrides_fail_on_one_line_with_the_valid_keys(cli, capsys, tmp_path: Path) -> None:
    cases = {
        "distill.temprature=3": "kd-train: error: distill.temprature: no such key in distill (KDLoss); did you mean "
        "temperature? valid: _target_, temperature, weight, ce_weight (a key the config lacks is added with "
        "+distill.temprature=...)",
        "trainer.max_epoch=3": "kd-train: error: trainer.max_epoch: no such key in trainer (Trainer); did you mean max_epochs? ",
        "callbacks.prune.amount=0.5": "kd-train: error: callbacks.prune: no such key in callbacks; valid: model_checkpoint, "
        "resume_checkpoint",
        "distill.temperature=[1": "kd-train: error: cannot parse an override: no viable alternative at input '[1' "
        "(override syntax: key=value, group=option, +new.key=value)",
    }
    for override, expected in cases.items():
        assert cli(override, f"hydra.run.dir={tmp_path / 'r'}") == 2, override
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(expected), line
    assert not (tmp_path / "r").exists()  # refused while composing: nothing written


def test_sweep_of_methods_and_seeds_shares_one_teacher(cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    store = tmp_path / "store"
    code = cli("-m", "distill=none,kd", "seed=0,1", "debug=fdr", f"teacher.store_dir={store}",
               f"hydra.sweep.dir={sweep}")
    assert code == 0
    runs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(4)]
    assert [(r["method"], r["seed"]) for r in runs] == [
        ("CrossEntropy", 0), ("CrossEntropy", 1), ("KDLoss", 0), ("KDLoss", 1)]
    assert [r["teacher"] and r["teacher"]["source"] for r in runs] == [None, None, "trained", "store"]
    assert runs[2]["overrides"] == ["distill=kd", "seed=0", "debug=fdr", f"teacher.store_dir={store}"]
    assert len(list(store.iterdir())) == 2  # one entry and its lock file


def test_multirun_with_script_relaunching_ddp_is_refused(cli, capsys, tmp_path: Path) -> None:
    code = cli("-m", "seed=0,1", "debug=fdr", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
               f"hydra.sweep.dir={tmp_path / 's'}")
    assert code == 2
    assert "use trainer.strategy=ddp_spawn" in capsys.readouterr().err
    assert not list((tmp_path / "s").rglob("results.json"))


def test_multirun_with_several_devices_and_auto_strategy_is_refused(cli, capsys, tmp_path: Path) -> None:
    # strategy "auto" on 2 devices is Lightning's script-relaunching ddp
    code = cli("-m", "seed=0,1", "debug=fdr", "trainer.devices=2", f"hydra.sweep.dir={tmp_path / 's'}")
    assert code == 2 and "use trainer.strategy=ddp_spawn" in capsys.readouterr().err


def test_a_finished_run_directory_is_left_untouched(cli, capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    assert cli("debug=fdr", "distill=none", f"hydra.run.dir={run_dir}") == 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code = cli("debug=fdr", "distill=none", "seed=7", f"hydra.run.dir={run_dir}")
    assert code == 2 and "already holds the results.json of another run" in capsys.readouterr().err
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # .hydra/config.yaml included


def test_an_unknown_feature_name_fails_before_any_teacher_is_trained(cli, capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    code = cli("debug=fdr", "distill=fitnet", "distill.student_nodes=[features.9]", f"hydra.run.dir={run_dir}")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("kd-train: error: distill.student_nodes: ConvNet has no node named 'features.9'")
    assert err.endswith("available: features.0, features.1, features.2, features.3, features.4, "
                        "features.5, features.6, features.7, pool, head.0, head.1, head.2")
    assert not (run_dir / "teachers").exists() and not (tmp_path / "outputs" / "teachers").exists()


def test_kd_nodes_lists_every_name_with_its_shape_and_the_taps(monkeypatch, capsys, tmp_path: Path) -> None:
    import sys

    from kd.cli.nodes import main

    monkeypatch.setattr(sys, "argv", ["kd-nodes", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])
    main()
    out = capsys.readouterr().out
    assert "model.student:\n# ConvNet: 12 FX nodes" in out
    assert "features.1  (1, 8, 8, 8)  <- preact" in out and "head.0      (1, 16)  <- pooled" in out
    assert "features.12  (1, 128, 4, 4)  <- stages" in out  # the teacher's second stage


def test_kd_nodes_lists_every_network_of_a_run_with_roles(monkeypatch, capsys, tmp_path: Path) -> None:
    import sys

    from kd.cli.nodes import main

    roles = ["+model/student@model.peers.p=digits_cnn", "+model/teacher@model.teachers.a=digits_cnn",
             "+model/student@model.teachers.b=digits_cnn_tiny", "+model/student@chain.links.x.model=digits_cnn_tiny"]
    monkeypatch.setattr(sys, "argv", ["kd-nodes", *roles, f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])
    main()
    heads = [line for line in capsys.readouterr().out.splitlines() if line.endswith(":")]
    assert heads == ["model.student:", "model.peers.p:", "model.teachers.a:", "model.teachers.b:", "chain.links.x.model:"]
