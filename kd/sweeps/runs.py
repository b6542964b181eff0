"""The runs a ``kd-table`` is made of: found in Hydra job directories or read from W&B.

A job directory is one holding ``.hydra/overrides.yaml`` (Hydra writes it in every job) or
``results.json``. Its status: ``results.json`` with ``"status": "completed"`` -> completed;
``"status": "failed"`` (a divergence) or ``failure.json`` (written by ``kd-train`` when the job
raised) -> failed; neither -> incomplete
(killed, or still running). A W&B run holds the whole ``results.json`` in its summary under
``results`` (see ``kd.training.loggers.finish_loggers``); one without it is failed or incomplete by state.

A key names what a table's rows and columns are made of. It is resolved per run, in order: an
override of the run's command line (``distill``, ``model/student``, ``distill.temperature``, as
written), a dotted path into the resolved config, a top-level field of ``results.json``.
Aliases: ``method`` (``distill``), ``student`` (``model/student``), ``teacher``
(``model/teacher``), ``temperature`` (``distill.temperature``), ``data``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.results import RESULTS_FILE, run_dir_state

ALIASES = {
    "method": "distill",
    "student": "model/student",
    "teacher": "model/teacher",
    "temperature": "distill.temperature",
    "data": "data",
    "protocol": "protocol",  # honest or paper (kd.training.protocol); runs from before protocols: honest
}
BASELINE_METHOD = "none"  # conf/distill/none.yaml: cross-entropy alone
_METHOD_KEYS = ("method", "distill")


class TableError(Exception):
    """Bad input to ``kd-table``: a missing directory, no runs, an unknown key (one line)."""


@dataclass
class Run:
    """One job, whatever its status.

    Attributes:
        where: The job directory, or the W&B run's path.
        status: ``"completed"``, ``"failed"`` or ``"incomplete"``.
        overrides: The job's command-line overrides (``key=value``).
        results: The content of ``results.json`` (completed runs only).
        error: Why the run is not completed, when known.
    """

    where: str
    status: str
    overrides: list[str] = field(default_factory=list)
    results: dict[str, Any] | None = None
    error: str | None = None

    @property
    def override_dict(self) -> dict[str, str]:
        """The overrides as ``{key: value}``, ``+``/``++`` prefixes dropped."""
        out = {}
        for item in self.overrides:
            key, sep, value = str(item).partition("=")
            if sep:
                out[key.lstrip("+~")] = value
        return out


def _last_name(target: Any) -> str | None:
    return str(target).rsplit(".", 1)[-1] if target else None


def dig(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def _fallback(results: dict[str, Any], canonical: str) -> str | None:
    """What an alias means when the run has no such override."""
    config = results.get("config") or {}
    if canonical == "distill":
        method = results.get("method")
        return BASELINE_METHOD if method == "CrossEntropy" else _scalar(method)
    if canonical in ("model/student", "model/teacher"):
        return _last_name(dig(config, canonical.replace("/", ".") + "._target_"))
    if canonical == "data":
        return _scalar((results.get("data") or {}).get("name"))
    return None


def key_value(run: Run, key: str) -> str | None:
    """The value of ``key`` for ``run`` as a string, or None when the run has no such key."""
    if key == "protocol":
        return run_protocol(run)[0] if run.status == "completed" else run.override_dict.get("protocol")
    canonical = ALIASES.get(key, key)
    overrides = run.override_dict
    if canonical in overrides:
        return overrides[canonical]
    results = run.results or {}
    value = _fallback(results, canonical)
    if value is None:
        value = _scalar(dig(results.get("config") or {}, canonical.replace("/", ".")))
    if value is None and key in results:
        value = _scalar(results[key])
    return value


def is_method_key(key: str) -> bool:
    return key in _METHOD_KEYS


def run_protocol(run: Run) -> tuple[str, str | None]:
    """The run's protocol (``kd.training.protocol``) and, under ``paper``, which epoch it reports
    (``last_epoch`` or ``best_test_epoch``); runs from before protocols are ``honest``."""
    protocol = (run.results or {}).get("protocol") or {}
    name = str(protocol.get("name") or "honest")
    return name, (protocol.get("reports") if name == "paper" else None)


def metric_value(run: Run, metric: str, *, final: bool = False) -> float | None:
    """The student's ``metric``: of the best-validation checkpoint, or of the final epoch; under
    ``protocol=paper``, of the epoch the column's paper reports (``--final``: the final epoch)."""
    student = (run.results or {}).get("student") or {}
    final = final or run_protocol(run)[1] == "last_epoch"
    value = (student.get("final_metrics" if final else "metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


ROLE = "role"
"""The key of a network's role in a run (``kd-table --rows role``): ``student``, ``peer <name>``,
``ensemble`` (of the student and its peers), ``link <name>`` (a chain's earlier links) or
``generations`` (the ensemble of a chain's students)."""


def with_roles(runs: list[Run]) -> list[Run]:
    """The runs, and for a run of several networks one more per network it reports besides its
    student (``kd.sweeps.runs.ROLE``), each with that network's record as ``student``.

    Only the student keeps the teacher (``teacher`` is None in the others): a teacher row counts it once.
    """
    out: list[Run] = []
    for run in runs:
        results = run.results
        if run.status != "completed" or not results:
            out.append(run)
            continue
        chain = results.get("chain") or {}
        roles: list[tuple[str, dict[str, Any]]] = [(f"link {link['name']}", link["student"]) for link in chain.get("links", [])]
        if chain.get("ensemble"):
            roles.append(("generations", {"metrics": chain["ensemble"], "final_metrics": {}}))
        roles += [(f"peer {name}", peer) for name, peer in (results.get("peers") or {}).items()]
        if results.get("ensemble"):
            roles.append(("ensemble", results["ensemble"]))
        out.append(Run(run.where, run.status, run.overrides, {**results, ROLE: "student"}, run.error))
        out += [Run(run.where, run.status, run.overrides, {**results, ROLE: role, "student": record, "teacher": None}, run.error)
                for role, record in roles]
    return out


def _natural(path: Path) -> list[Any]:
    """Sorts job 10 after job 9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def read_job(job: Path) -> Run:
    """The run of one job directory, in the state ``kd.results.run_dir_state`` gives it."""
    state = run_dir_state(job)
    status = "incomplete" if state.status == "new" else state.status
    results = state.results if status == "completed" else None
    return Run(str(job), status, state.overrides, results, error=state.error)


def _is_job(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() or (path / RESULTS_FILE).is_file()


def _jobs_under(root: Path) -> Iterable[Path]:
    """Job directories at or under ``root``; a job's own subdirectories (its teachers) are not searched."""
    if _is_job(root):
        yield root
        return
    for child in sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")), key=_natural):
        yield from _jobs_under(child)


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every job under ``paths`` (sweep directories, single runs, or parents of either).

    Raises:
        TableError: For a path that is not a directory, or when no job is found.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise TableError(f"not a directory: {path}")
        found = [job for job in _jobs_under(path) if job.resolve() not in seen]
        if not found:
            raise TableError(f"no job directory under {path} (a job holds .hydra/overrides.yaml or {RESULTS_FILE})")
        seen.update(job.resolve() for job in found)
        runs.extend(read_job(job) for job in found)
    return runs


def _plain(value: Any) -> Any:
    """W&B's summary objects (nested mappings) as plain dicts and lists."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def wandb_run(wrun: Any, path: str) -> Run:
    """One W&B run as a :class:`Run`: its ``results`` summary entry, else failed/incomplete by state."""
    where = f"wandb:{path}/{getattr(wrun, 'id', '?')}"
    summary = getattr(wrun, "summary", None) or {}
    results = _plain(summary.get("results")) if hasattr(summary, "get") else None
    state = str(getattr(wrun, "state", "unknown"))
    if isinstance(results, dict) and results.get("status") == "completed":
        return Run(where, "completed", list(results.get("overrides") or []), results)
    overrides = list(results.get("overrides") or []) if isinstance(results, dict) else []
    name = getattr(wrun, "name", None)
    if state in ("failed", "crashed"):
        return Run(where, "failed", overrides, error=f"W&B state {state}" + (f" ({name})" if name else ""))
    if state == "finished":
        return Run(where, "failed", overrides, error="W&B run finished without results in its summary")
    return Run(where, "incomplete", overrides, error=f"W&B state {state}")


def wandb_runs(path: str) -> list[Run]:
    """The runs of the W&B project ``path`` (``entity/project``), through ``wandb.Api()``.

    Raises:
        TableError: When the project cannot be read or has no runs.
    """
    import wandb

    if path.count("/") != 1:
        raise TableError(f"--wandb wants ENTITY/PROJECT, got {path!r}")
    try:
        runs = [wandb_run(r, path) for r in wandb.Api().runs(path)]
    except Exception as e:  # noqa: BLE001 - network, auth, unknown project: one line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TableError(f"cannot read W&B runs of {path}: {type(e).__name__}: {first}") from e
    if not runs:
        raise TableError(f"no runs in W&B project {path}")
    return runs
