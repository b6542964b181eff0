"""``kd-table --plot``: PNG figures of a sweep, drawn with matplotlib's Agg canvas (no display).

- ``temperature``: the student's metric against ``distill.temperature``, one line per student
  (and method, when there are several), error bars the sample std over seeds.
- ``heatmap``: mean metric of each method (rows) and student (columns; ``teacher->student``
  when the runs have several teachers), each cell annotated with its value.

Both use the same runs, keys and metric as the table (``kd.sweeps.runs``): completed runs only, the
selected best-validation checkpoint unless ``final``.
"""

from __future__ import annotations

import io
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from kd.results import _write_atomic
from kd.sweeps.runs import Run, TableError, key_value, metric_value

SIZE = (6.4, 4.8)  # inches
DPI = 100  # so every PNG is 640 x 480 pixels


def _figure():  # noqa: ANN202 - matplotlib types
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)  # no pyplot: no global state, no interactive backend
    return fig


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _write_atomic(path, lambda f: f.write(buf.getvalue()))
    return path


def _points(runs: list[Run], metric: str, final: bool) -> list[tuple[Run, float]]:
    scale = 100.0 if "acc" in metric.rsplit("/", 1)[-1] else 1.0
    out = []
    for run in runs:
        if run.status == "completed" and (value := metric_value(run, metric, final=final)) is not None:
            out.append((run, scale * value))
    return out


def _label(metric: str, final: bool) -> str:
    unit = " (%)" if "acc" in metric.rsplit("/", 1)[-1] else ""
    return f"{metric}{unit}, {'final epoch' if final else 'best-val checkpoint'}"


def temperature_plot(runs: list[Run], path: Path, *, metric: str = "test/acc", final: bool = False) -> Path:
    """Plots the metric against ``distill.temperature``; one line per student (and method).

    Returns:
        ``path``, written.

    Raises:
        TableError: When no completed run has a numeric temperature.
    """
    groups: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run, value in _points(runs, metric, final):
        try:
            t = float(key_value(run, "temperature") or "nan")
        except ValueError:
            continue
        if not math.isnan(t):
            groups[(key_value(run, "student") or "-", key_value(run, "method") or "-")][t].append(value)
    if not groups:
        raise TableError("--plot temperature: no completed run has a numeric distill.temperature")
    several_methods = len({method for _, method in groups}) > 1
    fig = _figure()
    ax = fig.add_subplot()
    for (student, method), by_t in groups.items():
        ts = sorted(by_t)
        means = [statistics.mean(by_t[t]) for t in ts]
        stds = [statistics.stdev(by_t[t]) if len(by_t[t]) > 1 else 0.0 for t in ts]
        ax.errorbar(ts, means, yerr=stds, marker="o", capsize=3, label=f"{student} / {method}" if several_methods else student)
    ax.set_xlabel("temperature")
    ax.set_ylabel(_label(metric, final))
    ax.set_title("accuracy against temperature (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def heatmap(runs: list[Run], path: Path, *, metric: str = "test/acc", final: bool = False) -> Path:
    """A method x student heatmap of the mean metric, each cell annotated.

    Returns:
        ``path``, written.

    Raises:
        TableError: When there is no completed run with the metric.
    """
    points = _points(runs, metric, final)
    if not points:
        raise TableError(f"--plot heatmap: no completed run has {metric}")
    teachers = {key_value(r, "teacher") for r, _ in points if (r.results or {}).get("teacher")}

    def pair(run: Run) -> str:
        student = key_value(run, "student") or "-"
        return f"{key_value(run, 'teacher')}->{student}" if len(teachers) > 1 and run.results.get("teacher") else student

    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run, value in points:
        cells[(key_value(run, "method") or "-", pair(run))].append(value)
    methods = list(dict.fromkeys(m for m, _ in cells))
    students = list(dict.fromkeys(s for _, s in cells))
    grid = [[statistics.mean(cells[(m, s)]) if (m, s) in cells else math.nan for s in students] for m in methods]
    fig = _figure()
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=_label(metric, final))
    ax.set_xticks(range(len(students)), students, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    finite = [v for row in grid for v in row if not math.isnan(v)]
    middle = (min(finite) + max(finite)) / 2
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}\nn={len(cells[(methods[i], students[j])])}", ha="center", va="center",
                        color="black" if v > middle else "white", fontsize=9)
    ax.set_xlabel("student")
    ax.set_ylabel("method")
    ax.set_title("mean accuracy by method and student")
    return _save(fig, path)


PLOTTERS: dict[str, Callable[..., Path]] = {"temperature": temperature_plot, "heatmap": heatmap}
