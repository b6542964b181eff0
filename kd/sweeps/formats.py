"""The tables of ``kd-table`` as text: Markdown, LaTeX (booktabs) and CSV.

``Table`` holds the cells (each the runs' values of one row and column label) that
``kd.sweeps.table.build_table`` groups; the formatters here only lay them out, in the table's units
(percent for accuracies), with the runs left out of the table listed below it.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from kd.sweeps.runs import Run

Label = tuple[str, ...]
MISSING = "-"

@dataclass
class Cell:
    """The runs of one cell: their metric values (in display units) and the difference to the baseline."""

    values: list[float] = field(default_factory=list)
    diff: float | None = None
    protocol: str | None = None  # of its runs (kd.training.protocol): never two in one cell
    best_test: bool = False  # protocol=paper, a column whose paper reports the best test epoch: marked

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None


@dataclass
class Table:
    """A table of cells by (row label, column label), each label a tuple of key values."""

    row_keys: list[str]
    col_keys: list[str]
    metric: str
    final: bool
    percent: bool
    rows: list[Label]
    cols: list[Label]
    cells: dict[tuple[Label, Label], Cell]
    teacher: dict[Label, Cell]
    skipped: list[tuple[Run, str]]
    baseline: str | None = None
    published: dict[str, float] = field(default_factory=dict)  # column label (or "teacher") -> the paper's number
    published_best: set[str] = field(default_factory=set)  # column labels whose published number is a best test epoch


BEST_TEST = "†"  # the mark of a cell that is the best test epoch (protocol=paper, mdistiller lineage)


def _number(cell: Cell, pm: str) -> str:
    text = f"{cell.mean:.2f}" + (f"{pm}{cell.std:.2f}" if cell.std is not None else "")
    return text + (f" ({cell.diff:+.2f})" if cell.diff is not None else "") + (f" {BEST_TEST}" if cell.best_test else "")


def measure(cell: Cell, final: bool) -> str:
    """Which epoch a cell's values are: ``best_val_checkpoint`` or ``final_epoch`` (protocol honest),
    ``last_epoch`` or ``best_test_epoch`` (protocol paper)."""
    if cell.protocol == "paper":
        return "best_test_epoch" if cell.best_test else "last_epoch"
    return "final_epoch" if final else "best_val_checkpoint"


def _title(table: Table) -> str:
    unit = " (%)" if table.percent else ""
    protocols = {c.protocol for c in table.cells.values()}
    honest = "final epoch" if table.final else "best-validation checkpoint"
    paper = f"protocol=paper: the last epoch, or the best test epoch where marked {BEST_TEST}, as each column's paper reports"
    which = (f"the {honest}" if protocols <= {"honest", None} else paper if protocols == {"paper"}
             else f"the {honest} (protocol=honest); {paper}")
    note = f"; (±x.xx): difference to {table.baseline}" if table.baseline else ""
    return f"{table.metric}{unit} of {which}, mean ± std over runs (n runs per cell){note}"


def unlisted(table: Table) -> list[str]:
    """One line per run left out of the table: its status, overrides, why, and where it is."""
    return [f"{run.status}: {' '.join(run.overrides) or '(no overrides)'} -- {reason} [{run.where}]"
            for run, reason in table.skipped]


def _body(table: Table) -> list[tuple[str, list[Cell | None]]]:
    lines = []
    if table.teacher:
        lines.append(("teacher", [table.teacher.get(c) for c in table.cols]))
    lines += [(" / ".join(r), [table.cells.get((r, c)) for c in table.cols]) for r in table.rows]
    return lines


def to_markdown(table: Table) -> str:
    """The table in Markdown, its title above and the runs not in it below."""
    head = [f"{' / '.join(table.row_keys)} \\ {' / '.join(table.col_keys)}", *(" / ".join(c) for c in table.cols)]
    rows = [[label.replace("|", "\\|"), *(f"{_number(c, ' ± ')}, n={c.n}" if c else MISSING for c in cells)]
            for label, cells in _body(table)]
    out = [_title(table), "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + [":-:"] * len(table.cols)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if table.published:
        out.append("| " + " | ".join([_published_label(table), *(_paper(table, c) for c in table.cols)]) + " |")
    if not table.cells:
        out.append("\nno completed run")
    if table.skipped:
        out += ["", f"not in the table ({len(table.skipped)}):", *(f"- {line}" for line in unlisted(table))]
    return "\n".join(out) + "\n"


def _published_label(table: Table, esc: Callable[[str], str] = str, mark: str = BEST_TEST) -> str:
    """``published``, the teacher's number, and what the marked numbers measure (``esc``: LaTeX escaping)."""
    notes = [esc(f"teacher {table.published['teacher']:g}")] if "teacher" in table.published else []
    if table.published_best:
        notes.append(mark + esc(" best test epoch, else last"))
    return esc("published") + (esc(" (") + esc("; ").join(notes) + esc(")") if notes else "")


def _paper(table: Table, col: Label, mark: str = BEST_TEST) -> str:
    label = " / ".join(col)
    value = table.published.get(label)
    return MISSING if value is None else f"{value:g}" + (f" {mark}" if label in table.published_best else "")


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")):
        text = text.replace(a, b) if a != "\\" else text.replace(a, "\x00")
    return text.replace("\x00", r"\textbackslash{}")


def to_latex(table: Table) -> str:
    """A booktabs ``tabular``; the runs not in it as comments."""
    def cell(c: Cell | None) -> str:
        if c is None:
            return MISSING
        num = f"{c.mean:.2f}" + (rf" \pm {c.std:.2f}" if c.std is not None else "")
        diff = f" ({c.diff:+.2f})" if c.diff is not None else ""
        mark = r"$^\dagger$" if c.best_test else ""
        return f"${num}${diff}{mark} {{\\scriptsize n={c.n}}}"

    corner = _tex(" / ".join(table.row_keys)) + r" \textbackslash{} " + _tex(" / ".join(table.col_keys))
    out = [f"% kd-table: {_title(table)}", r"\begin{tabular}{l" + "c" * len(table.cols) + "}", r"\toprule",
           " & ".join([corner, *(_tex(" / ".join(c)) for c in table.cols)]) + r" \\", r"\midrule"]
    body = _body(table)
    for i, (label, cells) in enumerate(body):
        out.append(" & ".join([_tex(label), *map(cell, cells)]) + r" \\")
        if i == 0 and table.teacher and len(body) > 1:
            out.append(r"\midrule")
    if table.published:
        dagger = r"$^\dagger$"
        out += [r"\midrule", " & ".join([_published_label(table, _tex, dagger), *(_paper(table, c, dagger) for c in table.cols)])
                + r" \\"]
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [f"% not in the table: {_tex(line)}" for line in unlisted(table)]
    return "\n".join(out) + "\n"


def to_csv(table: Table) -> str:
    """One line per cell: row, col, mean, std, n, diff (in the table's units; empty when none),
    and the protocol and epoch of its values (``measure``)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", "col", "mean", "std", "n", "diff", "protocol", "measure"])
    for label, cells in _body(table):
        for col, c in zip(table.cols, cells):
            if c is not None:
                writer.writerow([label, " / ".join(col), repr(round(c.mean, 6)),
                                 "" if c.std is None else repr(round(c.std, 6)), c.n,
                                 "" if c.diff is None else repr(round(c.diff, 6)), c.protocol or "honest",
                                 measure(c, table.final)])
    for label, value in table.published.items():
        writer.writerow(["published", label, repr(value), "", "", "", "", ""])
    return buf.getvalue()
