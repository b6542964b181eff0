"""The worked examples of the "Writing a ..." guides, run for real, and the README's links to docs/.

``docs/examples/`` holds the code the guides walk through; these tests plug it in the way the
guides say (``hydra.searchpath`` and ``PYTHONPATH=docs/examples``) and check what it does.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch

from kd.errors import ConfigError
from kd.models import build_model, count_parameters
from kd.models.features import FeatureExtractor, available_nodes
from kd.outputs import ModelOutput
from kd.training.run import run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
SEARCHPATH = f"hydra.searchpath=[file://{EXAMPLES / 'conf'}]"
# guides announced in the README whose pages are written later
ANNOUNCED = {"docs/writing-a-datamodule.md", "docs/writing-a-compression-callback.md"}
# on top of debug=fdr: two epochs of two batches, no compression report
SHORT = ("trainer.max_epochs=2", "trainer.limit_train_batches=2", "report.enabled=false")


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> None:
    """``docs/examples`` importable, as ``PYTHONPATH=docs/examples`` makes it for kd-train."""
    monkeypatch.syspath_prepend(str(EXAMPLES))


def train_log(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``csv/metrics.csv`` that hold the epoch's training losses."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    return [row for row in rows if "train/loss" in row]


# docs/writing-a-method.md: logit matching (Ba & Caruana 2014)

def test_logit_mse_is_half_the_squared_logit_distance_averaged_over_the_batch(examples) -> None:
    from logit_mse import LogitMSELoss, logit_mse_loss

    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)  # (B, C) = (2, 3)
    teacher = torch.tensor([[0.0, 2.0, 5.0], [1.0, 1.0, 1.0]])
    # row 0: (1 + 0 + 4) / 2 = 2.5; row 1: (1 + 1 + 1) / 2 = 1.5; mean 2.0
    loss = logit_mse_loss(student, teacher)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(student.grad, (student - teacher).detach() / 2)  # (s - t) / B

    batch = {"input": torch.zeros(2, 1), "target": torch.tensor([2, 0]), "index": torch.arange(2)}
    terms = LogitMSELoss(weight=0.5, ce_weight=0.1)(ModelOutput(student), ModelOutput(teacher), batch)
    assert set(terms) == {"ce", "logit_mse"}
    assert terms["logit_mse"].item() == pytest.approx(0.5 * 2.0)
    # CE of [1, 2, 3] at class 2 is log(1 + e^-1 + e^-2); of [0, 0, 0] at class 0, log 3
    ce = (math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(3)) / 2
    assert terms["ce"].item() == pytest.approx(0.1 * ce)
    with pytest.raises(ConfigError, match="weight"):
        LogitMSELoss(weight=-1.0)


def test_logit_mse_trains_as_a_distill_option_and_logs_its_terms_by_name(make_cfg, examples, tmp_path: Path) -> None:
    cfg = make_cfg(SEARCHPATH, "distill=logit_mse", "distill.ce_weight=0.5", *SHORT)
    results = run(cfg)
    assert results["method"] == "LogitMSELoss" and results["status"] == "completed"
    assert results["config"]["distill"] == {"_target_": "logit_mse.LogitMSELoss", "weight": 1.0, "ce_weight": 0.5}
    assert results["student"]["epochs"] == 2
    epochs = train_log(tmp_path / "run")
    assert len(epochs) == 2
    for row in epochs:  # each term under its own name, and the loss is their sum
        assert row["train/loss_logit_mse"] > 0 and row["train/loss_ce"] > 0
        assert row["train/loss"] == pytest.approx(row["train/loss_logit_mse"] + row["train/loss_ce"], rel=1e-5)


# docs/writing-a-model.md: a depthwise-separable student

@pytest.mark.parametrize(
    ("num_classes", "in_channels", "stem", "channels"), [(10, 1, 8, [16, 32]), (100, 3, 5, [7, 9, 11]), (2, 4, 1, [1])]
)
def test_separable_cnn_has_the_parameters_of_its_formula(examples, num_classes, in_channels, stem, channels) -> None:
    from separable_cnn import SeparableCNN, parameter_count

    model = SeparableCNN(num_classes=num_classes, in_channels=in_channels, stem=stem, channels=channels)
    assert count_parameters(model) == parameter_count(num_classes, in_channels, stem, channels)


def test_separable_cnn_config_builds_for_the_data_with_the_taps_methods_read(make_cfg, examples) -> None:
    cfg = make_cfg(SEARCHPATH, "model/student=separable_cnn")
    model = build_model(cfg.model.student, key="model.student", num_classes=10, input_shape=(1, 8, 8))
    assert count_parameters(model) == 1_418  # the config's comment; 9*8 + 16 + 248 + 752 + 330
    taps = cfg.model.student._nodes_
    mode, names = available_nodes(model)
    assert mode == "fx" and {*taps.stages, *taps.preact, taps.pooled, taps.hint} <= set(names)
    extractor = FeatureExtractor(model, [*taps.stages, taps.pooled], key="nodes", input_shape=(1, 8, 8))
    out = extractor(torch.zeros(2, 1, 8, 8))
    shapes = {name: tuple(out.features[name].shape) for name in out.features}
    assert shapes == {"blocks.0.pw_act": (2, 16, 8, 8), "blocks.1.pw_act": (2, 32, 4, 4), "flatten": (2, 32)}


def test_separable_cnn_refuses_a_net_without_blocks(examples) -> None:
    from separable_cnn import SeparableCNN

    with pytest.raises(ConfigError, match="channels"):
        SeparableCNN(num_classes=10, in_channels=1, channels=[])


def test_separable_cnn_trains_as_the_student_of_a_feature_method(make_cfg, examples, tmp_path: Path) -> None:
    cfg = make_cfg(SEARCHPATH, "model/student=separable_cnn", "distill=at", *SHORT)
    results = run(cfg)
    assert results["student"]["params"] == 1_418 and results["teacher"]["params"] == 294_986
    assert results["student"]["epochs"] == 2
    weights = torch.load(results["student"]["weights"], weights_only=True)
    assert {key.split(".")[0] for key in weights} == {"stem", "blocks", "fc"}  # the student alone
    assert all(row["train/loss_at"] > 0 for row in train_log(tmp_path / "run"))


# README.md, the front door

def test_the_readme_is_short_and_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\((docs/[^)#\s]+\.md)", readme))
    assert pages - linked == set(), "docs pages the README does not link"
    assert linked - pages <= ANNOUNCED, "README links to docs pages that do not exist"


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_relative_links_of_a_docs_page_point_at_files(page: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", text):
        path = (ROOT / "docs" / target).resolve()
        assert path.exists() or path.relative_to(ROOT).as_posix() in ANNOUNCED, f"{page}: {target}"
