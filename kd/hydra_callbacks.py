"""Hydra callbacks of kd-train (registered in conf/hydra/default.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kd.results import RESULTS_FILE


class RefuseUsedRunDir(Callback):
    """Stops before Hydra writes ``.hydra/`` into a directory that holds an earlier run's results.

    Hydra saves the composed config into the run directory before kd's code runs; pointing
    ``hydra.run.dir`` at a finished run would overwrite that run's record. Exits with status 2
    and one line on stderr, like every kd input error.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        found = next(sweep.rglob(RESULTS_FILE), None) if sweep.is_dir() else None
        if found is not None:
            self._refuse(sweep, "hydra.sweep.dir", found=found)

    @staticmethod
    def _refuse(run_dir: Path, key: str, found: Path | None = None) -> None:
        found = found or run_dir / RESULTS_FILE
        if found.is_file():
            print(
                f"kd-train: error: {key}: {run_dir} already holds the results of another run "
                f"({found}); give this run a new directory", file=sys.stderr, flush=True,
            )
            sys.exit(2)
