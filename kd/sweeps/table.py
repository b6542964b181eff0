"""A paper-style table of a sweep's runs: mean ± std over seeds, the baseline difference.

Reads Hydra job directories (a multirun directory, several, or a parent searched recursively)
or a W&B project (``kd.sweeps.runs``), groups the completed runs by the values of the row and column
keys, and shows each cell's mean ± sample std (ddof=1) of the student's metric and the number
of runs n. The metric is the selected best-validation checkpoint's (``--final``: the final
epoch's), never the best epoch on the test set; a run of ``protocol=paper`` gives the epoch its
column's paper reports (the last, or the best test epoch, marked), and one cell never holds runs
of two protocols (``kd.training.protocol``). Failed and incomplete runs are listed below the
table, never dropped silently. With the method on an axis and a ``none`` method (cross-entropy
alone) among its values, each cell also shows the difference of its mean to that baseline. Runs
of several datasets are never pooled into one cell: a ``dataset`` column key is added.

The command is ``kd-table`` (``kd.cli.table``).
"""

from __future__ import annotations

from typing import Any

from kd.sweeps.formats import MISSING, Cell, Label, Table
from kd.sweeps.runs import (
    ALIASES,
    BASELINE_METHOD,
    ROLE,
    Run,
    TableError,
    dig,
    is_method_key,
    key_value,
    metric_value,
    run_protocol,
    with_roles,
)


def scale_of(metric: str) -> float:
    """Accuracies are shown in percent, anything else as stored."""
    return 100.0 if "acc" in metric.rsplit("/", 1)[-1] else 1.0


def check_keys(runs: list[Run], keys: list[str]) -> None:
    """Raises TableError for a key that no completed run has, listing the keys they have."""
    done = [r for r in runs if r.status == "completed"]
    for key in keys:
        if done and all(key_value(r, key) is None for r in done):
            available = sorted({k for r in runs for k in r.override_dict})
            raise TableError(f"unknown key {key!r}: no run has it; override keys: {', '.join(available) or 'none'} "
                             f"(aliases: {', '.join(ALIASES)}, dataset; or a dotted config path)")


def datasets(runs: list[Run]) -> dict[int, str]:
    """The dataset of each completed run (by ``id``), as a label: the datamodule's name without
    ``DataModule``, with its class count and test size where one datamodule served several
    (CIFAR-10 and CIFAR-100 are one ``CIFARDataModule``)."""
    found: dict[int, tuple[str, Any, Any]] = {}
    for run in runs:
        data = (run.results or {}).get("data") or {}
        if run.status == "completed" and data.get("name"):
            found[id(run)] = (str(data["name"]).removesuffix("DataModule"), data.get("num_classes"), data.get("test_size"))
    kinds: dict[str, set[tuple[str, Any, Any]]] = {}
    for identity in found.values():
        kinds.setdefault(identity[0], set()).add(identity)
    return {run: name if len(kinds[name]) == 1 else f"{name} ({classes} classes, {tested} test)"
            for run, (name, classes, tested) in found.items()}


def _order(labels: list[Label]) -> list[Label]:
    """Numbers in numeric order, anything else in order of appearance, position by position."""
    unique = list(dict.fromkeys(labels))
    if not unique:
        return []

    def numeric(i: int) -> bool:
        try:
            [float(label[i]) for label in unique]
            return True
        except ValueError:
            return False

    numeric_at = [numeric(i) for i in range(len(unique[0]))]
    appearance = [list(dict.fromkeys(label[i] for label in unique)) for i in range(len(unique[0]))]
    return sorted(unique, key=lambda lb: [float(v) if numeric_at[i] else appearance[i].index(v) for i, v in enumerate(lb)])


def _baseline_of(cell_label: Label, labels: list[Label], at: int, baseline: str) -> Label | None:
    """The label on the same axis whose method is the baseline, matching the other keys if it can."""
    candidates = [lb for lb in labels if lb[at] == baseline]
    same = [lb for lb in candidates if all(v == cell_label[i] for i, v in enumerate(lb) if i != at)]
    return (same or candidates)[0] if len(same) == 1 or len(candidates) == 1 else None


def build_table(runs: list[Run], rows: list[str], cols: list[str], *, metric: str = "test/acc", final: bool = False,
                baseline: str | None = None, teacher: bool = True, published: str | None = None) -> Table:
    """Groups the completed runs into cells; lists the others with the reason.

    Args:
        runs: All runs, whatever their status.
        rows: Keys whose values make the row labels.
        cols: Keys whose values make the column labels.
        metric: The student's metric (``test/acc``).
        final: Use the final epoch's metrics instead of the selected checkpoint's.
        baseline: The method value of the baseline (None: ``none`` when present; ``""``: no baseline).
        teacher: Add a teacher row (its test metric per column, one value per distinct teacher).
        published: Dotted config path of a mapping from column label to the paper's number
            (``pair.published`` of the CIFAR experiments), shown as a ``published`` row.

    Returns:
        The table.

    Raises:
        TableError: For a key no run has, or a baseline the method axis does not hold.
    """
    runs = with_roles(runs)  # the peers, links and ensembles of runs of several networks, one run each
    if any(key_value(r, ROLE) not in (None, "student") for r in runs) and ROLE not in (*rows, *cols):
        rows = [*rows, ROLE]  # never pooled with the students
    check_keys(runs, [k for k in (*rows, *cols) if k != "dataset"])
    data = datasets(runs)

    def label(run: Run, key: str) -> str | None:
        return data.get(id(run)) if key == "dataset" else key_value(run, key)

    # runs of several datasets are never pooled into one cell: unless the data keys given split them, a
    # dataset column key is added (CIFAR-10 and CIFAR-100 runs without a data= override share data's label)
    split: dict[tuple[str | None, ...], set[str]] = {}
    for run in runs:
        if id(run) in data:
            split.setdefault(tuple(label(run, k) for k in (*rows, *cols) if ALIASES.get(k, k) in ("data", "dataset")),
                             set()).add(data[id(run)])
    if any(len(found) > 1 for found in split.values()):
        cols = ["dataset", *cols]

    scale = scale_of(metric)
    cells: dict[tuple[Label, Label], Cell] = {}
    teachers: dict[Label, dict[str, float]] = {}
    skipped = [(r, r.error or r.status) for r in runs if r.status != "completed"]
    for run in (r for r in runs if r.status == "completed"):
        value = metric_value(run, metric, final=final)
        if value is None:
            skipped.append((run, f"no {metric} in the student's {'final_metrics' if final else 'metrics'}"))
            continue
        row = tuple(label(run, k) or MISSING for k in rows)
        col = tuple(label(run, k) or MISSING for k in cols)
        cell = cells.setdefault((row, col), Cell())
        name, reports = run_protocol(run)
        if cell.protocol not in (None, name):
            raise TableError(f"the cell {' / '.join(row)} | {' / '.join(col)} holds runs of protocol {cell.protocol} and "
                             f"{name}: kd-table never averages across protocols; add protocol to --cols or --rows")
        cell.protocol, cell.best_test = name, cell.best_test or (reports == "best_test_epoch" and not final)
        cell.values.append(scale * value)
        t = (run.results or {}).get("teacher") or {}
        t_value = (t.get("metrics") or {}).get(metric)
        if isinstance(t_value, (int, float)):  # one value per distinct teacher: a stored teacher counts once
            teachers.setdefault(col, {})[str(t.get("path") or t.get("key") or run.where)] = scale * t_value
    row_labels = _order([r for r, _ in cells])
    col_labels = _order([c for _, c in cells])
    table = Table(rows, cols, metric, final, scale == 100.0, row_labels, col_labels, cells,
                  {c: Cell(list(v.values())) for c, v in teachers.items()} if teacher else {}, skipped)
    _add_baseline(table, baseline)
    if published:
        table.published = _published(runs, published, col_labels)
        table.published_best = {" / ".join(col) for (_, col), cell in cells.items()
                                if any(_best_test_published(r) for r in runs if r.status == "completed"
                                       and tuple(label(r, k) or MISSING for k in cols) == col)}
    return table


def _best_test_published(run: Run) -> bool:
    """Whether the published number of the run's column is a best test epoch (``protocol.published_measure``)."""
    config = (run.results or {}).get("config") or {}
    return dig(config, "protocol.published_measure") == "best_test_epoch"


def _published(runs: list[Run], key: str, cols: list[Label]) -> dict[str, float]:
    """The paper's number of each column (and of the teacher), from the runs' configs at ``key``."""
    found: dict[str, float] = {}
    for run in runs:
        numbers = dig((run.results or {}).get("config") or {}, key)
        if isinstance(numbers, dict):
            found.update({str(k): float(v) for k, v in numbers.items() if isinstance(v, (int, float))})
    if not found:
        raise TableError(f"--published {key}: no run's config has numbers there (the CIFAR experiments: pair.published)")
    wanted = {" / ".join(c) for c in cols} | {"teacher"}
    return {k: v for k, v in found.items() if k in wanted}


def _add_baseline(table: Table, baseline: str | None) -> None:
    """Sets each cell's difference to the baseline method's cell in the same row (or column)."""
    if baseline == "":
        return
    axis = next(((name, i) for name, keys in (("cols", table.col_keys), ("rows", table.row_keys))
                 for i, k in enumerate(keys) if is_method_key(k)), None)
    if axis is None:
        if baseline is not None:
            raise TableError(f"--baseline {baseline}: no row or column key is the method (--cols method)")
        return
    name, at = axis
    labels = table.cols if name == "cols" else table.rows
    present = {lb[at] for lb in labels}
    if baseline is None:
        baseline = BASELINE_METHOD if BASELINE_METHOD in present else None
        if baseline is None:
            return
    elif baseline not in present:
        raise TableError(f"--baseline {baseline}: no such method in the table (methods: {', '.join(sorted(present))})")
    table.baseline = baseline
    for (row, col), cell in table.cells.items():
        mine = col if name == "cols" else row
        base = _baseline_of(mine, labels, at, baseline)
        if base is None or base == mine:
            continue
        other = table.cells.get((row, base) if name == "cols" else (base, col))
        if other is not None:
            cell.diff = cell.mean - other.mean
