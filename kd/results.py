"""The record of a run and the state of its directory.

``results.json`` holds what a run measured, with everything needed to rerun it (``RunRecord``,
for completed and failed runs alike); ``run_dir_state`` decides what a run directory holds
(new, completed, failed, incomplete, resumable), for ``run()``, the commands and ``kd-table``.
Files are written atomically: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from kd.errors import ConfigError, NoSpace

RESULTS_FILE = "results.json"
FAILURE_FILE = "failure.json"  # a run that raised: what failed, so a sweep's table can list it
STUDENT_WEIGHTS = "student.pt"  # the selected student's state_dict, for deployment


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Writes through ``write`` to a temporary file beside ``path``, then renames it over ``path``.

    A reader sees the old file or the new one, never half of one. The content is built in memory
    first, so a disk without room for it is found before anything is written. The file gets the
    permissions of any file the user creates (``0666`` less the umask).

    Raises:
        NoSpace: When the disk has no room for the file (before writing, or when it fills meanwhile).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    write(buffer)
    data = buffer.getbuffer()
    free = shutil.disk_usage(path.parent).free
    if len(data) > free:
        raise NoSpace(path, len(data), free)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared store from colleagues
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(path, len(data), shutil.disk_usage(path.parent).free) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    _write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode()))


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    _write_atomic(path, lambda f: torch.save(obj, f))


@dataclass(frozen=True)
class RunDirState:
    """What a run directory holds. ``run_dir_state`` decides it; every command asks it.

    Attributes:
        path: The run directory.
        status: ``"new"`` (nothing of a run yet), ``"completed"``, ``"failed"`` (a recorded
            failure: a diverged run's ``results.json``, an unreadable one, or ``failure.json``
            of a run that raised) or ``"incomplete"`` (started: killed, or still running).
        results: The content of ``results.json`` when it is readable.
        error: Why the run is not completed, when known.
        overrides: The run's command-line overrides (from its record, else ``.hydra/overrides.yaml``).
        checkpoints: Whether ``checkpoints/`` holds any checkpoint.
    """

    path: Path
    status: str
    results: dict[str, Any] | None = None
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    checkpoints: bool = False

    @property
    def finished(self) -> bool:
        """``results.json`` is written: the directory belongs to that run and is never reused."""
        return (self.path / RESULTS_FILE).is_file()

    @property
    def resumable(self) -> bool:
        """Not finished, and it has checkpoints to continue from."""
        return self.checkpoints and not self.finished

    def refusal(self, key: str, overrides: list[str] | None = None) -> ConfigError | None:
        """Why a new run may not use this directory (None when it may), as a one-line error on ``key``.

        Args:
            key: The config key to blame.
            overrides: The new run's overrides. A failed run that left checkpoints is continued
                only by a run of the same overrides (``resume=`` aside), never by another config.
        """
        if not self.finished:
            if (overrides is not None and self.status == "failed" and self.checkpoints
                    and without_resume(overrides) != without_resume(self.overrides)):
                return ConfigError(key, f"{self.path} holds a run that failed ({self.error}) and was started with "
                                   f"other overrides ({' '.join(self.overrides) or 'none'}); give this run a new "
                                   "directory (hydra.run.dir=...), or rerun that run's command")
            return None
        if self.results is not None and self.results.get("status") == "failed":
            return ConfigError(key, f"{self.path} holds a run that failed ({self.error}); resuming it would fail "
                               "again: fix the cause and give the run a new directory (hydra.run.dir=...)")
        return ConfigError(key, f"{self.path} already holds the {RESULTS_FILE} of another run; give the run a new "
                           "directory (hydra.run.dir=...)")


def without_resume(overrides: list[str]) -> list[str]:
    """Overrides as a run's identity: sorted, ``resume=...`` left out."""
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("resume="))


def read_json(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A JSON object from ``path``, or None and why not."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, (str(e).splitlines()[0] if str(e) else type(e).__name__)
    if not isinstance(data, dict):
        return None, f"holds a {type(data).__name__}, not an object"
    return data, ""


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    try:
        saved = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):  # a broken overrides file only loses the labels
        return []
    return [str(o) for o in saved] if isinstance(saved, list) else []


def run_dir_state(run_dir: str | Path) -> RunDirState:
    """The state of a run directory: the one place that decides it (see ``RunDirState``)."""
    run_dir = Path(run_dir)
    overrides = _hydra_overrides(run_dir)
    checkpoints = any((run_dir / "checkpoints").glob("*.ckpt"))
    state = partial(RunDirState, run_dir, overrides=overrides, checkpoints=checkpoints)
    if (run_dir / RESULTS_FILE).is_file():
        results, why = read_json(run_dir / RESULTS_FILE)
        if results is None:
            return state("failed", error=f"unreadable {RESULTS_FILE}: {why}")
        if results.get("status") == "completed":
            return state("completed", results, overrides=list(results.get("overrides") or overrides))
        error = str(results.get("error") or "") or (
            "failed" if results.get("status") == "failed" else f"{RESULTS_FILE} has status {results.get('status')!r}")
        return state("failed", results, error)
    if (run_dir / FAILURE_FILE).is_file():
        failure, _ = read_json(run_dir / FAILURE_FILE)
        if failure is None:
            return state("failed", error=f"unreadable {FAILURE_FILE}")
        return state("failed", error=failure.get("error"), overrides=list(failure.get("overrides") or overrides))
    if overrides or checkpoints or (run_dir / ".hydra").is_dir():
        return state("incomplete", error=f"no {RESULTS_FILE} nor {FAILURE_FILE} (killed or still running)")
    return state("new")


HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def _trained(run_dir: Path) -> bool:
    """Whether a start trained in ``run_dir``: it holds a checkpoint."""
    return any((Path(run_dir) / "checkpoints").glob("*.ckpt"))


def _copy_record(src: Path, dst: Path) -> None:
    """Copies the ``.hydra/`` files (``HYDRA_FILES``) that ``src`` holds into ``dst``, atomically."""
    for path in (src / n for n in HYDRA_FILES):
        if path.is_file():
            write_bytes_atomic(dst / path.name, path.read_bytes())


def save_first_hydra_record(run_dir: Path, hydra_dir: Path) -> None:
    """Before Hydra starts a command again in a directory where a run trained, copies that run's
    ``.hydra/`` files to ``attempts/1/``: Hydra is about to write over them.

    A directory without checkpoints (no start trained there) is left alone, and so is one whose
    first record was saved already. See ``keep_first_hydra_record`` for the other half.
    """
    hydra_dir = Path(hydra_dir)
    first = hydra_dir / "attempts" / "1"
    if not first.is_dir() and _trained(run_dir):
        _copy_record(hydra_dir, first)


def keep_first_hydra_record(run_dir: Path, hydra_dir: Path) -> None:
    """Keeps the ``.hydra/`` files of the start that trained when a command runs again in its directory.

    Hydra writes ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` into ``hydra_dir`` at
    every start, a resume included, over the record of the run that trained there. When
    ``save_first_hydra_record`` saved that record in ``attempts/1/`` (the directory held
    checkpoints), this start's files are kept in ``attempts/<k>/`` and those of ``attempts/1/`` put
    back: what the run was started with is never overwritten. A directory where no start trained
    has no ``attempts/``: starts that left no checkpoint are forgotten, the next start is the first.
    """
    hydra_dir = Path(hydra_dir)
    attempts = hydra_dir / "attempts"
    if not attempts.is_dir():
        return
    if not _trained(run_dir):
        shutil.rmtree(attempts)
        return
    done = sorted(int(p.name) for p in attempts.iterdir() if p.name.isdigit())
    _copy_record(hydra_dir, attempts / str(done[-1] + 1))
    _copy_record(attempts / "1", hydra_dir)


def task_overrides() -> list[str]:
    """The command-line overrides of this run (empty when not started by Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@dataclass
class RunRecord:
    """The record of one run, completed or failed: ``results.json`` (and ``failure.json``).

    Every record starts with the same header (version, commit, status, times, directory,
    overrides, method, seed). ``write`` is the one place ``results.json`` is written.

    Args:
        run_dir: The run's directory (``paths.output_dir``).
        overrides: Its command-line overrides.
        method: The distillation method's class name, once built.
        seed: The run's seed, once known.
    """

    run_dir: Path
    overrides: list[str]
    method: str | None = None
    seed: int | None = None
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    fields: dict[str, Any] = field(default_factory=dict, repr=False)
    _start: float = field(default_factory=time.time, repr=False)
    _git: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def git(self) -> dict[str, Any]:
        """``git_info()`` of the kd source, asked once per run."""
        if self._git is None:
            self._git = git_info()
        return self._git

    def header(self, status: str) -> dict[str, Any]:
        import kd

        return {
            "kd_version": kd.__version__, "git": self.git, "status": status, "started_at": self.started_at,
            "wall_time_s": round(time.time() - self._start, 2), "run_dir": str(self.run_dir),
            "overrides": list(self.overrides), "method": self.method, "seed": self.seed,
        }

    def write(self, status: str, **fields: Any) -> dict[str, Any]:
        """Writes ``results.json`` atomically: the header, then the fields written so far updated with
        ``fields`` (a later write adds to an earlier one). Returns what was written."""
        self.fields.update(fields)
        record = {**self.header(status), **self.fields}
        write_json_atomic(Path(self.run_dir) / RESULTS_FILE, record)
        return record

    def write_failure(self, error: BaseException) -> Path | None:
        """Records a run that raised as ``failure.json``; never beside a ``results.json``.

        Returns:
            The file written, or None when the directory holds a ``results.json`` (the error
            then is about that directory, which belongs to another run, or the run recorded its
            own failure there) or cannot be written.
        """
        import traceback

        run_dir = Path(self.run_dir)
        if (run_dir / RESULTS_FILE).exists():
            return None
        lines = str(error).strip().splitlines()
        record = {
            **self.header("failed"),
            "error": f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": "),
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        }
        try:
            write_json_atomic(run_dir / FAILURE_FILE, record)
        except (OSError, NoSpace):
            return None
        return run_dir / FAILURE_FILE

    def clear_failure(self) -> None:
        """Removes the ``failure.json`` of an earlier attempt in this directory."""
        (Path(self.run_dir) / FAILURE_FILE).unlink(missing_ok=True)


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
        named = [(f"teacher {name}", info) for name, info in (teacher.get("members") or {}).items()]
        for label, info in (*named, ("ensemble" if named else "teacher", teacher)):
            m = info["metrics"]
            rows.append((label, f"{info['params']:,}", _pct(m.get("val/acc")), _pct(m.get("test/acc")), "     -"))
    student = results["student"]
    m, f = student["metrics"], student["final_metrics"]
    for link in (results.get("chain") or {}).get("links", []):  # the links before this run, in order
        m, f = link["student"]["metrics"], link["student"]["final_metrics"]
        rows.append((f"link {link['name']}", f"{link['student']['params']:,}", _pct(m.get("val/acc")),
                     _pct(m.get("test/acc")), _pct(f.get("test/acc"))))
    m, f = student["metrics"], student["final_metrics"]
    rows.append(("student", f"{student['params']:,}", _pct(m.get("val/acc")), _pct(m.get("test/acc")), _pct(f.get("test/acc"))))
    for name, peer in (results.get("peers") or {}).items():
        m, f = peer["metrics"], peer["final_metrics"]
        rows.append((f"peer {name}", f"{peer['params']:,}", _pct(m.get("val/acc")), _pct(m.get("test/acc")), _pct(f.get("test/acc"))))
    chained = (results.get("chain") or {}).get("ensemble")
    if chained:
        rows.append(("generations", f"{chained['params']:,}", _pct(chained.get("val/acc")), _pct(chained.get("test/acc")), "     -"))
    if results.get("ensemble"):
        m, f = results["ensemble"]["metrics"], results["ensemble"]["final_metrics"]
        params = student["params"] + sum(p["params"] for p in results["peers"].values())
        rows.append(("ensemble", f"{params:,}", _pct(m.get("val/acc")), _pct(m.get("test/acc")), _pct(f.get("test/acc"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = []
    if teacher:
        how = {"trained": "trained now and stored", "store": "reused from the store", "checkpoint": "loaded from",
               "pretrained": "pretrained, used as is:"}
        for name, info in (teacher.get("members") or {"": teacher}).items():
            notes.append(f"teacher{' ' + name if name else ''}: {how.get(info['source'], info['source'])} {info['path']}")
    selected = {"best_val": "best-validation checkpoint", "best_test_epoch": "best test epoch"}.get(student["selected"], "final weights")
    notes.append(f"student: {results['method']}, val/test of the {selected}" + (f" (epoch {student['best_epoch']})" if student.get("best_epoch") is not None else ""))
    protocol = results.get("protocol") or {}
    if protocol.get("name") == "paper":  # the papers' measurement: say what it is, beside the numbers
        notes.append(f"protocol=paper: trained on all {protocol['train_size']:,} training images, validated on the test set; "
                     f"reports the {protocol['reports'].replace('_', ' ')}: test {_pct(protocol.get('test/acc')).strip()} %")
    if results.get("chain"):
        reused = [link["name"] for link in results["chain"]["links"] if link["reused"]]
        notes.append(f"chain: each link taught by the one above it (stored in {Path(results['chain']['links'][0]['run_dir']).parent}"
                     f"{'; reused: ' + ', '.join(reused) if reused else ''}); generations: the mean of their probabilities")
    if results.get("peers"):
        notes.append("peers: each at its own best-validation checkpoint (peers/<name>/student.pt); the ensemble (mean "
                     "of the probabilities of the student and its peers) at the student's")
    notes.append(f"wall time {results['wall_time_s']:.1f} s; results in {results['run_dir']}/{RESULTS_FILE}")
    return "\n".join(["accuracy (%)", *lines, *notes])
