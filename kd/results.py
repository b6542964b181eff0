"""``results.json``: what a run measured, with everything needed to rerun it; and its summary."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

RESULTS_FILE = "results.json"
FAILURE_FILE = "failure.json"  # a run that raised: what failed, so a sweep's table can list it
STUDENT_WEIGHTS = "student.pt"  # the selected student's state_dict, for deployment


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes through ``write`` to a temporary file beside ``path``, then renames it over ``path``.

    A reader sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode()))


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    _write_atomic(path, lambda f: torch.save(obj, f))


def failed_run_error(path: Path) -> str:
    """The error recorded in a ``results.json`` that marks a failed run (a divergence); '' otherwise."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(results, dict) or results.get("status") != "failed":
        return ""
    return str(results.get("error") or "failed")


def write_failure(run_dir: Path, error: BaseException, *, overrides: list[str]) -> Path | None:
    """Records a failed run as ``failure.json`` in ``run_dir``; never over a finished run's results.

    Args:
        run_dir: The run's directory (``paths.output_dir``).
        error: What the run raised.
        overrides: The run's command-line overrides.

    Returns:
        The file written, or None when ``run_dir`` holds a ``results.json`` (the error then is
        about that directory, which belongs to another run) or cannot be written.
    """
    import traceback
    from datetime import datetime, timezone

    import kd

    run_dir = Path(run_dir)
    if (run_dir / RESULTS_FILE).exists():
        return None
    lines = str(error).strip().splitlines()
    record = {
        "status": "failed",
        "error": f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": "),
        "overrides": list(overrides),
        "run_dir": str(run_dir),
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kd_version": kd.__version__,
        "git": git_info(),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    }
    try:
        write_json_atomic(run_dir / FAILURE_FILE, record)
    except OSError:
        return None
    return run_dir / FAILURE_FILE


def git_info() -> dict[str, Any]:
    """The commit of the kd source tree and whether it has uncommitted changes (None outside git)."""
    src = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=src, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _pct(value: float | None) -> str:
    return f"{100 * value:6.2f}" if value is not None else "     -"


def summary_table(results: dict[str, Any]) -> str:
    """A short plain-text table of a run's results, for the end of the log."""
    rows = [("model", "params", "val acc", "test acc", "test acc (final epoch)")]
    teacher = results.get("teacher")
    if teacher:
        m = teacher["metrics"]
        rows.append(("teacher", f"{teacher['params']:,}", _pct(m.get("val/acc")), _pct(m.get("test/acc")), "     -"))
    student = results["student"]
    m, f = student["metrics"], student["final_metrics"]
    rows.append(("student", f"{student['params']:,}", _pct(m.get("val/acc")), _pct(m.get("test/acc")), _pct(f.get("test/acc"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = []
    if teacher:
        how = {"trained": "trained now and stored", "store": "reused from the store", "checkpoint": "loaded from",
               "pretrained": "pretrained, used as is:"}
        notes.append(f"teacher: {how.get(teacher['source'], teacher['source'])} {teacher['path']}")
    selected = "best-validation checkpoint" if student["selected"] == "best_val" else "final weights"
    notes.append(f"student: {results['method']}, val/test of the {selected}" + (f" (epoch {student['best_epoch']})" if student.get("best_epoch") is not None else ""))
    notes.append(f"wall time {results['wall_time_s']:.1f} s; results in {results['run_dir']}/{RESULTS_FILE}")
    return "\n".join(["accuracy (%)", *lines, *notes])
