"""Hydra callbacks of kd-train (registered in conf/hydra/default.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write

from kd.errors import ConfigError, check_writable_dir
from kd.results import RESULTS_FILE, keep_first_hydra_record, run_dir_state, save_first_hydra_record, without_resume


class RefuseUsedRunDir(Callback):
    """Stops before Hydra writes ``.hydra/`` into a directory that holds an earlier run's results.

    Hydra saves the composed config into the run directory before kd's code runs; pointing
    ``hydra.run.dir`` at a finished run would overwrite that run's record. Exits with status 2
    and one line on stderr, like every kd input error.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._writable(Path(config.hydra.run.dir), "hydra.run.dir")
        self._refuse(Path(config.hydra.run.dir), "hydra.run.dir", list(config.hydra.overrides.task))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
        if str(config.get("resume")) == "auto":  # an interrupted sweep again: kd-train skips the finished jobs
            return
        sweep = Path(config.hydra.sweep.dir)
        found = next(sweep.rglob(RESULTS_FILE), None) if sweep.is_dir() else None
        if found is not None:
            self._refuse(found.parent, "hydra.sweep.dir")

    @staticmethod
    def _writable(run_dir: Path, key: str) -> None:
        """Hydra creates the directory next, with a traceback when it cannot: one line instead."""
        try:
            check_writable_dir(run_dir, key, keep=False)
        except ConfigError as e:
            print(f"kd-train: error: {e} (runs go under paths.root: KD_OUTPUT_ROOT)", file=sys.stderr, flush=True)
            sys.exit(2)

    @staticmethod
    def _refuse(run_dir: Path, key: str, overrides: list[str] | None = None) -> None:
        refused = run_dir_state(run_dir).refusal(key, overrides)
        if refused is not None:
            print(f"kd-train: error: {refused}", file=sys.stderr, flush=True)
            sys.exit(2)


def find_unfinished_run(runs: Path, overrides: list[str]) -> Path | None:
    """The newest resumable run directory under ``runs`` (checkpoints, no ``results.json``)
    started with ``overrides`` (``resume=`` aside)."""
    want = without_resume(overrides)
    found = []
    for saved in runs.glob("*/*/.hydra/overrides.yaml") if runs.is_dir() else []:
        state = run_dir_state(saved.parent.parent)
        if state.resumable and without_resume(state.overrides) == want:
            found.append(state.path)
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


class ResumeRunDir(Callback):
    """``kd-train ... resume=auto``, run again with the command that was interrupted, continues in
    the newest unfinished run directory of the same overrides, not in a new timestamped one.

    With ``hydra.run.dir`` given, that directory is used as it is.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(config.get("resume")) != "auto":
            return
        if any(o.lstrip("+").startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra):
            return
        found = find_unfinished_run(Path(str(config.paths.root)) / "runs", list(config.hydra.overrides.task))
        if found is not None:
            with read_write(config.hydra):
                config.hydra.run.dir = str(found)


class KeepFirstRecord(Callback):
    """Hydra rewrites ``.hydra/`` at every start in a run directory (a resume too). Where a run
    trained already, its files are saved in ``.hydra/attempts/1/`` before Hydra writes
    (``on_run_start``, after ``ResumeRunDir`` chose the directory; ``on_multirun_start`` for every job
    of a sweep resumed with ``resume=auto``); after, this start's files go to
    ``.hydra/attempts/<k>/`` and those of the first put back (``on_job_start``, before kd's code).
    A first run has no ``attempts/``. A DDP rank that Lightning started writes no ``.hydra/``
    (``hydra.output_subdir=null``).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is not None:
            run_dir = Path(str(config.hydra.run.dir))
            save_first_hydra_record(run_dir, run_dir / str(subdir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir, sweep = config.hydra.output_subdir, Path(str(config.hydra.sweep.dir))
        if subdir is None or str(config.get("resume")) != "auto" or not sweep.is_dir():
            return
        for hydra_dir in sweep.rglob(str(subdir)):
            if (hydra_dir / "overrides.yaml").is_file():
                save_first_hydra_record(hydra_dir.parent, hydra_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is not None:
            run_dir = Path(str(config.hydra.runtime.output_dir))
            keep_first_hydra_record(run_dir, run_dir / str(subdir))
