"""Compression in real kd-train runs: the configs of conf/callbacks/, the report, the artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from kd.compress.artifacts import load_artifact
from kd.errors import ConfigError
from kd.training.run import run
from tests.conftest import compose_cfg

REPO = Path(__file__).resolve().parents[2]


def _rows(results: dict) -> dict[str, dict]:
    return {r["name"]: r for r in results["report"]["rows"]}


def _kd_eval(*artifacts: Path) -> list[dict]:
    """kd-eval on each artifact, in one fresh process: the artifacts must load with nothing of this one.

    One interpreter for all of them, since starting one (torch, Lightning) takes ~20 s here.
    """
    code = "import sys; from kd.cli.eval import main; [main([a, 'data=digits']) for a in sys.argv[1:]]"
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, artifacts)], capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["artifact"] for r in results] == list(map(str, artifacts))
    return results


def test_a_plain_run_reports_teacher_and_student_and_exports_the_student(make_cfg, tmp_path: Path) -> None:
    results = run(make_cfg("report.teacher=true", "report.latency.batch_sizes=[1,64]", "report.onnx=true"))
    rows = _rows(results)
    assert list(rows) == ["teacher", "student"]
    student = rows["student"]
    assert student["params"] == results["student"]["params"] == 1442
    assert student["sparsity"] == 0.0 and student["size_bytes"] > 0
    assert set(student["latency_ms"]) == {"b1", "b64"} and all(v > 0 for v in student["latency_ms"].values())
    assert student["test_acc"] == results["student"]["metrics"]["test/acc"]
    # the program holds the selected weights: it computes what student.pt computes
    from kd.models.build import build_model

    net = build_model(make_cfg().model.student, key="model.student", num_classes=10, input_shape=(1, 8, 8))
    net.load_state_dict(torch.load(tmp_path / "run" / "student.pt", weights_only=True))
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(load_artifact(tmp_path / "run" / "student.pt2")(x), net.eval()(x))
    onnx = load_artifact(tmp_path / "run" / "student.onnx")
    torch.testing.assert_close(onnx(x), net(x), atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["report"]["rows"] == results["report"]["rows"]


def test_prune_agp_reaches_the_target_sparsity_and_the_artifact_keeps_the_zeros(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("callbacks=prune_agp", "callbacks.prune.final_sparsity=0.8", "model.student.channels=[16,32]")
    results = run(cfg)
    summary = results["report"]["compression"][0]
    assert abs(summary["sparsity"] - 0.8) <= 0.01  # of the pruned conv/linear weights
    rows = _rows(results)
    assert rows["student_dense"]["sparsity"] == 0.0 and rows["student_dense"]["dense_epoch"] == 0
    compressed = rows["student_compressed"]
    assert compressed["params"] == rows["student_dense"]["params"]
    assert compressed["nonzero_params"] < 0.3 * compressed["params"]
    program = torch.export.load(tmp_path / "run" / "student.pt2")
    weights = [t for n, t in program.state_dict.items() if n.endswith("weight") and t.dim() > 1]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zeros - 0.8) <= 0.01


QAT_STUDENTS = {
    "conv": ["model/student=digits_cnn_tiny", "model.student.channels=[32,64]"],  # the PT2E flow
    "mlp": ["model/student=hinton_mlp_800"],  # linear: torchao's QATConfig
}


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    """Per flow: the results of a run with QAT from epoch 2 of 4, and kd-eval of its student.pt2."""
    tmp = tmp_path_factory.mktemp("qat")  # one teacher store: the second run reuses the first's teacher
    results, artifacts = {}, []
    for flow, student in QAT_STUDENTS.items():
        cfg = compose_cfg([
            "callbacks=qat", "callbacks.qat.start_epoch=2", "trainer.max_epochs=4", "trainer.limit_train_batches=8",
            "teacher.recipe.max_epochs=2", "report.teacher=false", "report.latency.batch_sizes=[1]",
            "report.latency.repeats=2", *student,
        ], tmp)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp / flow)
        results[flow] = run(cfg)
        artifacts.append(tmp / flow / "student.pt2")
    return dict(zip(QAT_STUDENTS, zip(results.values(), _kd_eval(*artifacts))))


@pytest.mark.parametrize("flow", list(QAT_STUDENTS))
def test_qat_gives_a_smaller_int8_artifact_that_kd_eval_scores_like_the_fake_quantized_model(
    qat_runs: dict[str, tuple[dict, dict]], flow: str
) -> None:
    results, evaluated = qat_runs[flow]
    rows = _rows(results)
    compressed, dense = rows["student_compressed"], rows["student_dense"]
    assert compressed["int8"] is True and dense["dense_epoch"] == 2
    # int8 weights are 4x smaller; the program's graph is a fixed cost, large next to 20k weights
    assert compressed["size_bytes"] < dense["size_bytes"]
    assert results["report"]["ratios"]["size"] == pytest.approx(dense["size_bytes"] / compressed["size_bytes"], abs=1e-3)
    fake_quant = results["student"]["metrics"]["test/acc"]
    assert compressed["fake_quant_test_acc"] == fake_quant
    assert fake_quant > 0.5  # it learned something, so agreement is not luck
    assert evaluated["test/acc"] == pytest.approx(compressed["test_acc"])
    assert abs(evaluated["test/acc"] - fake_quant) <= 0.01


def test_prune_then_quantize_with_kd_gives_a_sparse_int8_student(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "callbacks=[prune_agp,qat]", "callbacks.prune.final_sparsity=0.8", "callbacks.qat.start_epoch=0",
        "model.student.channels=[32,64]",
    )
    results = run(cfg)
    assert [s["callback"] for s in results["report"]["compression"]] == ["MagnitudePruning", "QuantizationAwareTraining"]
    compressed = _rows(results)["student_compressed"]
    assert compressed["int8"] is True and compressed["sparsity"] > 0.7
    program = torch.export.load(tmp_path / "run" / "student.pt2")
    ints = [t for t in [*program.state_dict.values(), *program.constants.values()]
            if isinstance(t, torch.Tensor) and t.dtype == torch.int8 and t.dim() > 1]
    assert ints, "no int8 weights in the program"
    zeros = sum(int((t == 0).sum()) for t in ints) / sum(t.numel() for t in ints)
    assert zeros >= 0.79  # the pruned weights stay zero through QAT and conversion


def test_structured_pruning_makes_the_student_smaller(make_cfg) -> None:
    results = run(make_cfg("callbacks=prune_channels", "callbacks.prune.amount=0.5", "model.student.channels=[32,64]"))
    rows = _rows(results)
    dense, small = rows["student_dense"], rows["student_compressed"]
    assert small["params"] < 0.5 * dense["params"] and small["size_bytes"] < dense["size_bytes"]
    assert results["student"]["params"] == small["params"]


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["callbacks=prune_agp", "callbacks.prune.final_sparsity=1.0"], "callbacks.prune.final_sparsity", "[0, 1)"),
        (["callbacks=prune_agp", "callbacks.prune.final_sparsity=-0.1"], "callbacks.prune.final_sparsity", "[0, 1)"),
        (["callbacks=qat", "callbacks.qat.start_epoch=3"], "callbacks.qat.start_epoch", "max_epochs"),
        (["callbacks=qat", "callbacks.qat.start_epoch=0", "distill=fitnet"], "callbacks.qat", "feature"),
        (["callbacks=prune_channels", "distill=fitnet"], "callbacks.prune", "feature"),
        (["callbacks=[prune_channels,qat]", "callbacks.qat.start_epoch=1"], "callbacks.qat", "cannot run with"),
        (["callbacks=[early_stopping,prune_agp]"], "callbacks", "early stopping"),
        (["callbacks=prune_agp", "trainer.devices=2", "+trainer.strategy=ddp_spawn"], "trainer.devices", "one device"),
    ],
    ids=["sparsity_1", "sparsity_negative", "qat_after_the_end", "qat_feature_method", "channels_feature_method",
         "channels_with_qat", "early_stopping", "two_devices"],
)
def test_bad_compression_settings_fail_before_training(
    make_cfg, tmp_path: Path, overrides: list[str], key: str, words: str
) -> None:
    cfg = make_cfg(*overrides, "trainer.max_epochs=2")
    with pytest.raises(ConfigError) as info:
        run(cfg)
    assert info.value.key.startswith(key) and words in info.value.message
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list((tmp_path / "run").glob("teachers/*"))  # failed before the teacher trained
