"""kd-eval as a user runs it: one summary line and one JSON line, one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd.cli.eval import main
from kd.compress.artifacts import export_program
from kd.compress.evaluate import evaluate_model
from kd.data import DigitsDataModule
from kd.models import MLP
from kd.training.run import run
from tests.datagen import write_mnist


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule()  # the settings of conf/data/digits.yaml that decide the test split
    dm.setup("test")
    return dm


@pytest.fixture(scope="module")
def exported(digits: DigitsDataModule, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MLP]:
    """An MLP fitted to digits for 200 full-batch Adam steps (about a second), exported to .pt2."""
    torch.manual_seed(0)
    model = MLP(10, in_features=64, hidden=[32, 32])
    train = digits.splits["train"]
    x, y = train.inputs, train.targets  # (N, 1, 8, 8), (N,)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export_program(model, (1, 8, 8), tmp_path_factory.mktemp("run") / "student.pt2"), model.eval()


def kd_eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs kd-eval in this process: exit status, stdout, stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_model_counts_correct_argmax(digits: DigitsDataModule, exported) -> None:
    _, model = exported
    test = digits.splits["test"]
    x, y = test.inputs, test.targets  # (360, 1, 8, 8), (360,)
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    metrics = evaluate_model(model, digits.test_dataloader())
    assert metrics == {"test/acc": correct / 360, "test/errors": 360 - correct, "test/n": 360}
    assert metrics["test/acc"] > 0.85  # the fitted model, not an untrained one
    model.train()
    assert evaluate_model(model, [{"input": x[:7], "target": y[:7]}])["test/n"] == 7
    assert model.training  # its mode is given back


def test_kd_eval_prints_a_summary_line_and_json_equal_to_evaluate_model(capsys, digits: DigitsDataModule, exported) -> None:
    # kd-eval in a fresh process is run on the int8 programs of QAT (tests/compress/test_run_compression.py)
    path, model = exported
    expected = evaluate_model(model, digits.test_dataloader())
    code, out, err = kd_eval(capsys, str(path), "data=digits")
    assert code == 0, err
    lines = out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {k: result[k] for k in expected} == expected
    assert result["artifact"] == str(path) and result["data"] == "digits"
    assert result["bytes"] == path.stat().st_size
    n, errors = expected["test/n"], expected["test/errors"]
    assert lines[-2] == (
        f"kd-eval: student.pt2 on DigitsDataModule test split: "
        f"acc {100 * expected['test/acc']:.2f}% ({n - errors}/{n}), {errors} errors"
    )


def test_batch_size_changes_batches_not_results(capsys, exported) -> None:
    path, _ = exported
    runs = [kd_eval(capsys, str(path), *args) for args in ([], ["batch_size=7"])]
    assert [code for code, _, _ in runs] == [0, 0]
    first, second = (json.loads(out.splitlines()[-1]) for _, out, _ in runs)
    assert first == second


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(expected, err.strip()), err


def test_wrong_path_is_one_line_with_status_2(capsys, tmp_path: Path) -> None:
    code, out, err = kd_eval(capsys, str(tmp_path / "run" / "student.pt2"))
    assert out == ""
    assert_one_line_error(
        code, err, rf"kd-eval: error: artifact: file not found: {re.escape(str(tmp_path))}/run/student.pt2 "
        r"\(kd-train writes student.pt2 in the run directory\)"
    )


def test_data_of_another_input_shape_is_refused(capsys, exported, tmp_path: Path) -> None:
    path, _ = exported
    root = write_mnist(tmp_path / "data")
    code, _, err = kd_eval(capsys, str(path), "data=mnist", f"data.root={root}", "data.val_size=40")
    assert_one_line_error(
        code, err, r"kd-eval: error: artifact: student.pt2 expects inputs of shape \(1, 8, 8\) but "
        r"data=mnist gives \(1, 28, 28\); pass the data the model was trained on"
    )


def test_typo_in_a_data_option_names_the_options(capsys, exported) -> None:
    path, _ = exported
    code, _, err = kd_eval(capsys, str(path), "data.eval_batchsize=8")
    assert_one_line_error(
        code, err, r"kd-eval: error: data.eval_batchsize: no such key in data \(DigitsDataModule\); did you mean "
        r"eval_batch_size, batch_size\? valid: _target_, batch_size, eval_batch_size, val_fraction, test_fraction, "
        r"split_seed, num_workers, fast \(a key the config lacks is added with \+data.eval_batchsize=...\)"
    )
    code, _, err = kd_eval(capsys, str(path), "data=digitz")
    assert_one_line_error(
        code, err, r"kd-eval: error: data=digitz: no such option in conf/data/; did you mean digits\? "
        r"valid: cifar10, cifar100, digits, imagenet, mnist"
    )


def test_student_pt_and_checkpoint_of_a_kd_train_run(capsys, make_cfg, tmp_path: Path) -> None:
    results = run(make_cfg("distill=none"))
    student = results["student"]
    assert student["selected"] == "best_val"  # student.pt holds these weights: compare with "metrics"
    expected = student["metrics"]
    for artifact in (student["weights"], student["checkpoint"]):
        code, out, err = kd_eval(capsys, artifact)
        assert code == 0, err
        got = json.loads(out.splitlines()[-1])
        assert got["test/acc"] == pytest.approx(expected["test/acc"], abs=1e-6)
        assert got["test/errors"] == expected["test/errors"] and got["test/n"] == results["data"]["test_size"]

    alone = tmp_path / "elsewhere" / "student.pt"  # weights without their results.json
    alone.parent.mkdir()
    shutil.copy(student["weights"], alone)
    code, _, err = kd_eval(capsys, str(alone))
    assert_one_line_error(
        code, err, r"kd-eval: error: artifact: .*no results.json .*evaluate the exported student.pt2 artifact instead"
    )

    other = json.loads((tmp_path / "run" / "results.json").read_text())  # a results.json of another model
    other["config"]["model"]["student"]["channels"] = [4, 16]
    (alone.parent / "results.json").write_text(json.dumps(other))
    code, _, err = kd_eval(capsys, str(alone))
    assert_one_line_error(
        code, err, r"kd-eval: error: artifact: .*student.pt does not fit the model.student of .*results.json "
        r"\(size mismatch for features.0.weight \(8, 1, 3, 3\) in the file vs \(4, 1, 3, 3\) in the model.*\); "
        r"a compressed student .* evaluate that instead"
    )

    # a text file named .pt is called unreadable; one that needs pickle is refused, then loads when allowed
    text = alone.parent / "notes.pt"
    text.write_text("accuracy 97%\n")
    code, _, err = kd_eval(capsys, str(text))
    assert_one_line_error(code, err, rf"kd-eval: error: artifact: {re.escape(str(text))} is truncated or corrupt \(.*\); .*")
    pickled = tmp_path / "run" / "pickled.pt"
    torch.save({"state_dict": torch.load(student["weights"], weights_only=True), "saved": __import__("datetime").date(2026, 12, 4)},
               pickled)
    code, _, err = kd_eval(capsys, str(pickled))
    assert_one_line_error(code, err, rf"kd-eval: error: artifact: {re.escape(str(pickled))} holds more than weights "
                          r"\(a pickled datetime.date\); .* set checkpoint.allow_pickle=true")
    code, out, err = kd_eval(capsys, str(pickled), "checkpoint.allow_pickle=true")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["test/acc"] == pytest.approx(expected["test/acc"], abs=1e-6)
