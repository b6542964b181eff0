"""protocol=paper: every training image trains, the test set validates, fp32, the paper's epoch
reported; protocol=honest never validates on the test set; kd-table never averages across them."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from datagen import write_cifar
from test_table import job

from kd.errors import ConfigError
from kd.sweeps.formats import to_csv, to_latex, to_markdown
from kd.sweeps.runs import TableError, find_runs
from kd.sweeps.table import build_table
from kd.training.run import run

SEEN: list[int] = []


class CountSamples(L.Callback):
    """Records the index of every sample a training batch carries."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *args: object) -> None:
        if trainer.current_epoch == 0:
            SEEN.extend(batch["index"].tolist())


def cifar_run(make_cfg, tmp_path: Path, monkeypatch, *overrides: str) -> dict:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # test_protocol, for the config to name
    write_cifar(tmp_path / "data", "cifar10", n_train=60, n_test=20)
    SEEN.clear()
    return run(make_cfg(
        "data=cifar10", f"paths.data_dir={tmp_path / 'data'}", "data.batch_size=16", "data.augment=false",
        "model/teacher=cifar_resnet56", "model/student=cifar_resnet8", "trainer.max_epochs=2", "teacher.recipe.max_epochs=1",
        "+callbacks.count._target_=test_protocol.CountSamples", "report.enabled=false", *overrides, fast=False,
    ))


@pytest.mark.parametrize("measure", ["last_epoch", "best_test_epoch"])
def test_paper_trains_on_every_training_image_and_reports_the_epoch_the_paper_reports(
    make_cfg, tmp_path: Path, monkeypatch, measure: str
) -> None:
    results = cifar_run(make_cfg, tmp_path, monkeypatch, "protocol=paper", f"protocol.published_measure={measure}")
    assert sorted(SEEN) == list(range(60))  # all 60 training images, each once an epoch: none held out
    protocol, student = results["protocol"], results["student"]
    assert (protocol["name"], protocol["train_size"], protocol["precision"]) == ("paper", 60, "32-true")
    assert protocol["validation"] == "the test set, every epoch" and protocol["reports"] == measure
    assert results["config"]["data"]["val_size"] == 0
    # validation ran on the test set: the final weights score the same on both
    assert student["final_metrics"]["val/acc"] == student["final_metrics"]["test/acc"]
    if measure == "last_epoch":  # nothing selected on the test set: the last epoch, student.pt its weights
        assert student["selected"] == "final" and student["metrics"] == student["final_metrics"]
    else:  # selected on the test set, and said so
        assert student["selected"] == "best_test_epoch"
        assert student["metrics"]["test/acc"] >= student["final_metrics"]["test/acc"]
    reported = student["final_metrics" if measure == "last_epoch" else "metrics"]["test/acc"]
    assert protocol["test/acc"] == reported
    teacher = json.loads((Path(results["teacher"]["path"]).parent / "meta.json").read_text())
    assert teacher["selected"] == "final"  # the teacher: its last epoch, as the released ckpt_epoch_240.pth


def test_honest_holds_a_validation_split_out_and_reports_the_best_validation_checkpoint(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    results = cifar_run(make_cfg, tmp_path, monkeypatch, "data.val_size=20", "trainer.max_epochs=1")
    assert len(SEEN) == 40 and results["protocol"]["train_size"] == 40
    assert results["protocol"]["validation"] == "20 images held out of the training set"
    assert results["protocol"]["reports"] == "best_val_checkpoint" and results["student"]["selected"] == "best_val"
    assert results["protocol"]["test/acc"] == results["student"]["metrics"]["test/acc"]


@pytest.mark.parametrize(("overrides", "key", "message"), [
    (("data=cifar10", "data.val_size=0"), "data.val_size", "0 validates on the test set, which the honest protocol never"),
    (("protocol=paper",), "protocol", r"has no val_size to set to 0 \(CIFAR-10/100 and MNIST have\)"),  # digits
    (("protocol=paper", "protocol.published_measure=best"), "protocol.published_measure", "must be one of last_epoch"),
])
def test_bad_protocols_fail_before_anything_trains(make_cfg, overrides, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        run(make_cfg(*overrides))
    assert e.value.key == key and not (Path(make_cfg().paths.output_dir) / "results.json").exists()


def paper_job(root: Path, name: str, overrides: list[str], best: float, last: float, reports: str | None) -> None:
    d = job(root, name, overrides, best, final_acc=last)
    if reports is not None:  # a run of protocol=paper
        results = json.loads((d / "results.json").read_text())
        results["protocol"] = {"name": "paper", "reports": reports}
        (d / "results.json").write_text(json.dumps(results))


def test_kd_table_shows_the_papers_epoch_marks_the_best_test_one_and_never_mixes_protocols(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    paper_job(root, "0", ["cifar_row=kd", "protocol=paper"], best=0.75, last=0.73, reports="last_epoch")
    paper_job(root, "1", ["cifar_row=dkd", "protocol=paper"], best=0.77, last=0.76, reports="best_test_epoch")
    table = build_table(find_runs([root]), rows=["protocol"], cols=["cifar_row"])
    cells = {c[0]: cell for (_, c), cell in table.cells.items()}
    assert (cells["kd"].mean, cells["kd"].best_test) == (73.0, False)  # CRD's column: the last epoch
    assert (cells["dkd"].mean, cells["dkd"].best_test) == (77.0, True)  # DKD's: the best test epoch, marked
    text = to_markdown(table)
    assert "77.00 †, n=1" in text and "the best test epoch where marked †" in text
    assert "paper,dkd,77.0,,1,,paper,best_test_epoch" in to_csv(table)
    paper_job(root, "2", ["cifar_row=kd"], best=0.74, last=0.72, reports=None)  # the honest protocol
    with pytest.raises(TableError, match="holds runs of protocol paper and honest: kd-table never averages across"):
        build_table(find_runs([root]), rows=[], cols=["cifar_row"])
    both = build_table(find_runs([root]), rows=["protocol"], cols=["cifar_row"])
    assert {r for r, _ in both.cells} == {("paper",), ("honest",)}
    assert both.cells[(("honest",), ("kd",))].mean == 74.0  # honest: the best-validation checkpoint


def test_the_published_row_says_which_numbers_are_a_best_test_epoch(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    published = {"teacher": 79.42, "kd": 73.33, "dkd": 76.32}
    for name, row, measure, acc in (("0", "kd", "last_epoch", 0.73), ("1", "dkd", "best_test_epoch", 0.76)):
        job(root, name, [f"cifar_row={row}"], acc, config={
            "model": {"student": {"_target_": "kd.models.ConvNet"}}, "distill": {},
            "protocol": {"name": "honest", "published_measure": measure}, "pair": {"published": published}})
    table = build_table(find_runs([root]), rows=[], cols=["cifar_row"], published="pair.published")
    assert table.published_best == {"dkd"}
    text = to_markdown(table)
    assert "| published (teacher 79.42; † best test epoch, else last) | 73.33 | 76.32 † |" in text
    assert r"76.32 $^\dagger$" in to_latex(table) and "published (teacher 79.42; $^\\dagger$ best" in to_latex(table)
