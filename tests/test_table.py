"""kd-table: runs found and classified, cells' maths, baseline, teacher row, outputs, plots, errors."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest

from kd.cli.table import main
from kd.sweeps.formats import to_csv, to_latex, to_markdown
from kd.sweeps.runs import Run, TableError, find_runs, key_value
from kd.sweeps.table import build_table


def job(root: Path, name: str, overrides: list[str], acc: float | None = None, *, final_acc: float | None = None,
        method: str = "KDLoss", teacher: dict | None = None, config: dict | None = None, failure: str | None = None,
        results_text: str | None = None) -> Path:
    """A job directory as Hydra and kd-train leave it: .hydra/overrides.yaml, then results or failure."""
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if acc is not None:
        results = {
            "status": "completed", "overrides": overrides, "method": method, "seed": 0, "teacher": teacher,
            "data": {"name": "DigitsDataModule"},
            "student": {"metrics": {"val/acc": 0.5, "test/acc": acc},
                        "final_metrics": {"test/acc": acc if final_acc is None else final_acc},
                        "selected": "best_val", "params": 10},
            "config": config or {"model": {"student": {"_target_": "kd.models.ConvNet"}}, "distill": {}},
        }
        (d / "results.json").write_text(json.dumps(results))
    if results_text is not None:
        (d / "results.json").write_text(results_text)
    if failure is not None:
        (d / "failure.json").write_text(json.dumps({"status": "failed", "error": failure, "overrides": overrides}))
    return d


T1 = {"source": "store", "path": "/store/t1.ckpt", "params": 99, "metrics": {"test/acc": 0.9}}
T2 = {"source": "store", "path": "/store/t2.ckpt", "params": 99, "metrics": {"test/acc": 0.8}}
ACC = {  # (student, method) -> test accuracies of seeds 0, 1, 2
    ("s1", "none"): [0.70, 0.72, 0.71], ("s1", "kd"): [0.75, 0.74, 0.78],
    ("s2", "none"): [0.60, 0.64, 0.61], ("s2", "kd"): [0.66],
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    i = 0
    for (student, method), accs in ACC.items():
        for seed, acc in enumerate(accs):
            teacher = None if method == "none" else (T1 if student == "s1" else T2 if seed == 0 else T1)
            job(root, str(i), [f"distill={method}", f"model/student={student}", f"seed={seed}"], acc, teacher=teacher,
                method="CrossEntropy" if method == "none" else "KDLoss")
            i += 1
    job(root, str(i), ["distill=kd", "model/student=s2", "seed=1"], failure="RuntimeError: CUDA out of memory")
    job(root, str(i + 1), ["distill=kd", "model/student=s2", "seed=2"])  # killed: no results, no failure
    return root


def pct(values: list[float]) -> list[float]:
    return [100 * v for v in values]


def test_cells_are_mean_sample_std_and_n_over_seeds(sweep: Path) -> None:
    table = build_table(find_runs([sweep]), ["student"], ["method"])
    assert table.rows == [("s1",), ("s2",)] and table.cols == [("none",), ("kd",)]
    for (student, method), accs in ACC.items():
        cell = table.cells[((student,), (method,))]
        assert cell.n == len(accs)
        assert cell.mean == pytest.approx(statistics.mean(pct(accs)))
        assert cell.std == (pytest.approx(statistics.stdev(pct(accs))) if len(accs) > 1 else None)
    md = to_markdown(table)
    s1kd, s1none = pct(ACC[("s1", "kd")]), pct(ACC[("s1", "none")])
    diff = statistics.mean(s1kd) - statistics.mean(s1none)
    assert (f"| s1 | {statistics.mean(s1none):.2f} ± {statistics.stdev(s1none):.2f}, n=3 | "
            f"{statistics.mean(s1kd):.2f} ± {statistics.stdev(s1kd):.2f} ({diff:+.2f}), n=3 |") in md
    s2none = pct(ACC[("s2", "none")])
    assert f"| 66.00 ({66 - statistics.mean(s2none):+.2f}), n=1 |" in md  # n=1: no std
    assert "| student \\ method | none | kd |" in md


def test_teacher_row_counts_each_stored_teacher_once(sweep: Path) -> None:
    table = build_table(find_runs([sweep]), ["student"], ["method"])
    kd = table.teacher[("kd",)]  # s1's three runs share T1, s2's one run has T2
    assert sorted(kd.values) == pytest.approx([80.0, 90.0])
    assert kd.std == pytest.approx(statistics.stdev([80.0, 90.0]))
    assert ("none",) not in table.teacher
    assert to_markdown(table).splitlines()[4] == f"| teacher | - | 85.00 ± {statistics.stdev([80.0, 90.0]):.2f}, n=2 |"
    assert to_markdown(build_table(find_runs([sweep]), ["method"], ["student"])).count("| teacher | 90.00, n=1 | ") == 1
    assert "| teacher |" not in to_markdown(build_table(find_runs([sweep]), ["student"], ["method"], teacher=False))


def test_failed_and_incomplete_runs_are_listed_and_the_rest_is_tabled(sweep: Path, tmp_path: Path, capsys) -> None:
    job(sweep, "99", ["distill=kd", "model/student=s1", "seed=9"], results_text='{"status": "comp')
    runs = find_runs([sweep])
    assert [r.status for r in runs].count("completed") == 10
    md = to_markdown(build_table(runs, ["student"], ["method"]))
    tail = md.split("not in the table (3):\n")[1].splitlines()
    assert tail[0].startswith("- failed: distill=kd model/student=s2 seed=1 -- RuntimeError: CUDA out of memory [")
    assert tail[1].startswith("- incomplete: distill=kd model/student=s2 seed=2 -- no results.json nor failure.json")
    assert tail[2].startswith("- failed: distill=kd model/student=s1 seed=9 -- unreadable results.json: ")
    assert "% not in the table: failed: distill=kd model/student=s2 seed=1" in to_latex(build_table(runs, ["student"], ["method"]))
    main([str(sweep), "--format", "csv"])  # the CSV has cells only: the others go to stderr
    assert capsys.readouterr().err.count("kd-table: not in the table: ") == 3


def test_final_uses_the_final_epoch_and_other_metrics_are_not_scaled(tmp_path: Path) -> None:
    for seed, (best, final) in enumerate([(0.5, 0.4), (0.7, 0.2)]):
        job(tmp_path, str(seed), [f"seed={seed}"], best, final_acc=final)
    runs = find_runs([tmp_path])
    assert build_table(runs, ["student"], ["method"]).cells[(("ConvNet",), ("KDLoss",))].mean == pytest.approx(60.0)
    assert build_table(runs, ["student"], ["method"], final=True).cells[(("ConvNet",), ("KDLoss",))].mean == pytest.approx(30.0)
    table = build_table(runs, ["student"], ["method"], metric="val/acc")
    assert table.cells[(("ConvNet",), ("KDLoss",))].std == 0.0
    runs[0].results["student"]["metrics"]["test/errors"] = 3
    runs[1].results["student"]["metrics"]["test/errors"] = 6
    table = build_table(runs, ["student"], ["method"], metric="test/errors")
    assert table.cells[(("ConvNet",), ("KDLoss",))].mean == 4.5 and not table.percent
    assert "no test/errors in the student's metrics" not in to_markdown(table)


def test_keys_resolve_from_overrides_then_config_then_results(tmp_path: Path) -> None:
    config = {"model": {"student": {"_target_": "kd.models.ResNet"}}, "distill": {"temperature": 4.0}, "lr": 0.1}
    job(tmp_path, "a", ["distill.temperature=8"], 0.5, config=config, method="CrossEntropy")
    job(tmp_path, "b", ["model/student=wrn"], 0.5, config=config)
    a, b = find_runs([tmp_path])
    assert key_value(a, "temperature") == "8" and key_value(b, "temperature") == "4.0"
    assert key_value(a, "student") == "ResNet" and key_value(b, "student") == "wrn"
    assert key_value(a, "method") == "none" and key_value(b, "method") == "KDLoss"  # distill=none runs CrossEntropy
    assert key_value(a, "data") == "DigitsDataModule" and key_value(a, "lr") == "0.1" and key_value(a, "seed") == "0"
    assert key_value(a, "nope") is None and key_value(a, "model.student") is None  # not a scalar


def test_baseline_on_rows_explicit_and_disabled(sweep: Path) -> None:
    runs = find_runs([sweep])
    by_rows = build_table(runs, ["method"], ["student"])
    s2 = by_rows.cells[(("kd",), ("s2",))]
    assert s2.diff == pytest.approx(66.0 - statistics.mean(pct(ACC[("s2", "none")])))
    assert by_rows.cells[(("none",), ("s2",))].diff is None
    assert all(c.diff is None for c in build_table(runs, ["student"], ["method"], baseline="").cells.values())
    kd_base = build_table(runs, ["student"], ["method"], baseline="kd")
    assert kd_base.cells[(("s1",), ("none",))].diff == pytest.approx(
        statistics.mean(pct(ACC[("s1", "none")])) - statistics.mean(pct(ACC[("s1", "kd")])))
    assert all(c.diff is None for c in build_table(runs, ["student"], ["seed"]).cells.values())


def test_latex_and_csv(sweep: Path) -> None:
    table = build_table(find_runs([sweep]), ["student"], ["method"])
    tex = to_latex(table)
    s1kd = pct(ACC[("s1", "kd")])
    assert r"\begin{tabular}{lcc}" in tex and r"\toprule" in tex and r"\bottomrule" in tex
    assert r"student \textbackslash{} method & none & kd \\" in tex
    assert f"${statistics.mean(s1kd):.2f} \\pm {statistics.stdev(s1kd):.2f}$ (" in tex
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert list(rows[0]) == ["row", "col", "mean", "std", "n", "diff", "protocol", "measure"]
    cell = next(r for r in rows if r["row"] == "s1" and r["col"] == "kd")
    assert float(cell["mean"]) == pytest.approx(statistics.mean(s1kd), abs=1e-6)
    assert float(cell["std"]) == pytest.approx(statistics.stdev(s1kd), abs=1e-6) and cell["n"] == "3"
    assert float(cell["diff"]) == pytest.approx(statistics.mean(s1kd) - statistics.mean(pct(ACC[("s1", "none")])), abs=1e-6)
    single = next(r for r in rows if r["row"] == "s2" and r["col"] == "kd")
    assert single["std"] == "" and single["n"] == "1"
    assert [r["row"] for r in rows].count("teacher") == 1


def test_cli_writes_every_format_atomically_and_prints_markdown(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main([str(sweep), "--rows", "student", "--cols", "method", "--format", "md,tex,csv", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["table.csv", "table.md", "table.tex"]  # no temporary files left
    assert (out / "table.md").read_text() == printed
    assert (out / "table.csv").read_text().startswith("row,col,mean,std,n,diff,protocol,measure\n")
    main([str(sweep), "--rows", "method,seed", "--cols", "student", "--format", "csv"])
    assert "\nnone / 0,s1,70.0,,1,,honest,best_val_checkpoint\n" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "kd-table: error: not a directory: {tmp}/missing"),
    (["{tmp}/empty"], "kd-table: error: no job directory under {tmp}/empty"),
    (["{tmp}/sweep", "--rows", "optimizer.lr"], "kd-table: error: unknown key 'optimizer.lr': no run has it; "
                                                 "override keys: distill, model/student, seed"),
    (["{tmp}/sweep", "--baseline", "dkd"], "kd-table: error: --baseline dkd: no such method in the table"),
    (["{tmp}/sweep", "--plot", "heatmap"], "kd-table: error: --plot writes PNG files: give --out DIR"),
    ([], "kd-table: error: give sweep directories or --wandb ENTITY/PROJECT"),
])
def test_bad_input_is_one_line_and_status_2(sweep: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    (tmp_path / "empty" / "logs").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(message.format(tmp=tmp_path))


def test_plots_are_real_pngs(sweep: Path, tmp_path: Path, capsys) -> None:
    from matplotlib.image import imread

    from kd.sweeps.plots import DPI, SIZE

    for i, t in enumerate([2, 2, 4, 4]):
        job(sweep, f"t{i}", ["distill=kd", "model/student=s1", f"distill.temperature={t}", f"seed={i}"], 0.5 + 0.1 * i)
    out = tmp_path / "plots"
    assert main([str(sweep), "--out", str(out), "--plot", "temperature", "--plot", "heatmap"]) == 0
    for name in ("temperature.png", "heatmap.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(out / name)
        assert pixels.shape[:2] == (round(SIZE[1] * DPI), round(SIZE[0] * DPI))
        assert pixels[..., :3].std() > 0.05 and len({tuple(p) for p in pixels[::7, ::7, :3].reshape(-1, 3).tolist()}) > 10
    with pytest.raises(SystemExit):  # the fixture's runs alone have no temperature override nor config value
        main([str(sweep / "0"), "--out", str(out), "--plot", "temperature"])
    assert "no completed run has a numeric distill.temperature" in capsys.readouterr().err


class FakeSummary(dict):
    """W&B's summary: a mapping whose nested values are mappings too, not dicts."""


class FakeRun:
    def __init__(self, id: str, state: str, results: dict | None) -> None:
        self.id, self.state, self.name, self.config = id, state, f"run-{id}", {}
        self.summary = FakeSummary({"results": FakeSummary(results)} if results else {"_step": 3})


def test_wandb_runs_make_the_same_table_as_directories(sweep: Path, monkeypatch, capsys) -> None:
    import wandb

    runs = find_runs([sweep])
    fakes = [FakeRun(str(i), "finished", r.results) for i, r in enumerate(runs) if r.status == "completed"]
    fakes += [FakeRun("f", "crashed", None), FakeRun("r", "running", None)]
    paths = []

    class FakeApi:
        def runs(self, path: str) -> list[FakeRun]:
            paths.append(path)
            return fakes

    monkeypatch.setattr(wandb, "Api", FakeApi)
    assert main(["--wandb", "team/kd", "--format", "csv"]) == 0
    from_wandb = capsys.readouterr().out
    main([str(sweep), "--format", "csv"])
    assert from_wandb == capsys.readouterr().out and paths == ["team/kd"]
    main(["--wandb", "team/kd"])
    md = capsys.readouterr().out
    assert "- failed: (no overrides) -- W&B state crashed (run-f) [wandb:team/kd/f]" in md
    assert "- incomplete: (no overrides) -- W&B state running [wandb:team/kd/r]" in md


def test_run_override_dict_drops_hydra_prefixes() -> None:
    assert Run("x", "completed", ["+a.b=1", "++c=x=y", "d"]).override_dict == {"a.b": "1", "c": "x=y"}


def test_table_of_a_real_sweep_of_methods_temperatures_and_seeds(cli, tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    code = cli("-m", "distill=kd,dkd", "distill.temperature=2,4", "seed=0,1", "debug=fdr",
               f"teacher.store_dir={tmp_path / 'store'}", f"hydra.sweep.dir={sweep}")
    assert code == 0
    capsys.readouterr()
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 8
    assert main([str(sweep), "--rows", "temperature", "--cols", "method", "--format", "csv"]) == 0
    rows = {(r["row"], r["col"]): r for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert sorted(rows) == sorted([(t, m) for t in ("2", "4") for m in ("kd", "dkd")] + [("teacher", "kd"), ("teacher", "dkd")])
    for t in ("2", "4"):
        for m in ("kd", "dkd"):
            accs = [100 * r["student"]["metrics"]["test/acc"] for r in results
                    if f"distill={m}" in r["overrides"] and f"distill.temperature={t}" in r["overrides"]]
            assert len(accs) == 2 and rows[(t, m)]["n"] == "2"
            assert float(rows[(t, m)]["mean"]) == pytest.approx(statistics.mean(accs), abs=1e-6)
            assert float(rows[(t, m)]["std"]) == pytest.approx(statistics.stdev(accs), abs=1e-6)
    assert rows[("teacher", "kd")]["n"] == "1"  # one stored teacher shared by the whole sweep
    main([str(sweep), "--rows", "temperature", "--cols", "method"])
    assert "| temperature \\ method | kd | dkd |" in capsys.readouterr().out


def test_published_row_comes_from_the_runs_config(tmp_path: Path) -> None:
    published = {"teacher": 79.42, "student": 72.5, "kd": 73.33, "dkd": 76.32}
    config = {"pair": {"published": published}, "distill": {}}
    for i, (row, acc) in enumerate([("student", 0.70), ("kd", 0.72), ("dkd", 0.74)]):
        job(tmp_path / "s", str(i), [f"cifar_row={row}", "experiment=pair"], acc, config=config)
    table = build_table(find_runs([tmp_path / "s"]), ["experiment"], ["cifar_row"], published="pair.published")
    assert table.published == {"teacher": 79.42, "student": 72.5, "kd": 73.33, "dkd": 76.32}
    md = to_markdown(table)
    assert "| published (teacher 79.42) | 72.5 | 73.33 | 76.32 |" in md
    assert "published (teacher 79.42) & 72.5 & 73.33 & 76.32 \\\\" in to_latex(table)
    rows = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert {r["col"]: float(r["mean"]) for r in rows if r["row"] == "published"} == published
    with pytest.raises(TableError, match="--published pair.numbers: no run's config"):
        build_table(find_runs([tmp_path / "s"]), ["experiment"], ["cifar_row"], published="pair.numbers")


def test_runs_of_different_datasets_are_never_pooled_into_one_cell(tmp_path: Path) -> None:
    data = {"digits": {"name": "DigitsDataModule", "num_classes": 10, "test_size": 360},
            "cifar10": {"name": "CIFARDataModule", "num_classes": 10, "test_size": 10000},
            "cifar100": {"name": "CIFARDataModule", "num_classes": 100, "test_size": 10000}}
    for i, (name, acc) in enumerate([("digits", 0.9), ("cifar10", 0.8), ("cifar100", 0.5), ("cifar100", 0.6)]):
        d = job(tmp_path, str(i), [f"seed={i}"], acc)  # the same overrides: the data came from an experiment
        results = json.loads((d / "results.json").read_text())
        results["data"] = data[name]
        (d / "results.json").write_text(json.dumps(results))
    runs = find_runs([tmp_path])
    table = build_table(runs, ["student"], ["method"])
    assert table.col_keys == ["dataset", "method"]
    means = {col[0]: cell.mean for (_, col), cell in table.cells.items()}
    assert means == pytest.approx({"Digits": 90.0, "CIFAR (10 classes, 10000 test)": 80.0,
                                   "CIFAR (100 classes, 10000 test)": 55.0})
    # data= names the datamodule for all three CIFAR runs: not a split, the dataset is still added
    assert build_table(runs, ["data"], ["method"]).col_keys == ["dataset", "method"]
    assert build_table(runs, ["dataset"], ["method"]).col_keys == ["method"]  # asked for: not added twice
    one = find_runs([tmp_path / "2", tmp_path / "3"])
    assert build_table(one, ["student"], ["method"]).col_keys == ["method"]  # one dataset: the table as before


def test_peers_links_and_ensembles_get_a_row_each(tmp_path: Path) -> None:
    base = job(tmp_path / "s", "0", ["distill=dml"], 0.70, method="DMLLoss")
    results = json.loads((base / "results.json").read_text())
    peer = {"metrics": {"test/acc": 0.68}, "final_metrics": {"test/acc": 0.66}, "params": 10}
    results.update(peers={"p": peer}, ensemble={"metrics": {"test/acc": 0.74}, "final_metrics": {"test/acc": 0.73}})
    (base / "results.json").write_text(json.dumps(results))
    chained = job(tmp_path / "s", "1", ["distill=kd"], 0.80, teacher=T1)
    results = json.loads((chained / "results.json").read_text())
    results["chain"] = {"links": [{"name": "gen1", "student": {"metrics": {"test/acc": 0.78}, "final_metrics": {}}}],
                        "ensemble": {"test/acc": 0.83, "val/acc": 0.8}}
    (chained / "results.json").write_text(json.dumps(results))
    table = build_table(find_runs([tmp_path / "s"]), ["student"], ["method"])
    assert table.row_keys == ["student", "role"]  # added: a peer is never pooled with a student
    means = {(r[-1], c[0]): cell.mean for (r, c), cell in table.cells.items()}
    assert means == {("student", "dml"): 70.0, ("peer p", "dml"): 68.0, ("ensemble", "dml"): 74.0,
                     ("student", "kd"): 80.0, ("link gen1", "kd"): 78.0, ("generations", "kd"): 83.0}
    assert {c[0]: cell.n for c, cell in table.teacher.items()} == {"kd": 1}  # the chain's teacher once
    final = build_table(find_runs([tmp_path / "s"]), ["role"], ["method"], final=True)
    assert final.cells[(("peer p",), ("dml",))].mean == 66.0
