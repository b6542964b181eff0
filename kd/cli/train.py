"""``kd-train``: the Hydra command line of kd. ``python -m kd.cli.train`` is the same.

Examples:
    kd-train                                       # the default experiment (digits, Hinton KD)
    kd-train distill=kd distill.temperature=8 distill.weight=0.5 distill.ce_weight=0.5 trainer.max_epochs=5
    kd-train -m distill=none,kd seed=0,1           # a sweep
    kd-train --help                                # the config groups and their options
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from kd.cli import config_dir
from kd.errors import ConfigError, Diverged
from kd.results import FAILURE_FILE, RESULTS_FILE, failed_run_error, write_failure
from kd.training.loggers import abort_wandb_run
from kd.training.run import check_launch, run, task_overrides


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Runs ``run(cfg)``; returns the selected student's ``val/acc``, the objective of a search sweeper.

    A run that raises leaves ``failure.json`` in its directory (one that diverged, a failed
    ``results.json``). A single run's ConfigError is one line on stderr and exit status 2; a
    divergence (``kd.errors.Diverged``) one line and status 1. In a multirun the error is one line too, then raised
    for Hydra: the sweep goes on with the next job (Hydra exits non-zero at the end; Optuna
    counts the trial as failed), and ``kd-table`` lists the failed job.
    """
    try:
        check_launch(cfg)  # about the whole sweep, not this job: stop it at once
    except ConfigError as e:
        print(f"kd-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    finished = Path(cfg.paths.output_dir) / RESULTS_FILE
    if str(cfg.get("resume")) == "auto" and finished.is_file() and not failed_run_error(finished):
        # an interrupted sweep run again with resume=auto: its finished jobs are not redone
        print(f"kd-train: resume=auto: {cfg.paths.output_dir} is finished; skipped", file=sys.stderr, flush=True)
        try:
            return json.loads(finished.read_text())["student"]["metrics"].get("val/acc")
        except (OSError, ValueError, KeyError, TypeError):
            return None
    try:
        results = run(cfg)
    except Exception as e:
        abort_wandb_run()
        write_failure(Path(cfg.paths.output_dir), e, overrides=task_overrides())
        multirun = _in_multirun()
        if isinstance(e, (ConfigError, Diverged)):
            where = f" ({cfg.paths.output_dir})" if multirun else ""
            kind = "error" if isinstance(e, ConfigError) else "diverged"
            print(f"kd-train: {kind}{where}: {e}", file=sys.stderr, flush=True)
            if not multirun:
                sys.exit(2 if isinstance(e, ConfigError) else 1)
        raise
    (Path(cfg.paths.output_dir) / FAILURE_FILE).unlink(missing_ok=True)  # of an earlier attempt in this directory
    return results["student"]["metrics"].get("val/acc")


def cli() -> None:
    """The ``kd-train`` command: ``main`` with one-line errors for configs Hydra cannot compose."""
    from kd.cli.compose_errors import run_app

    run_app(main, "kd-train")


if __name__ == "__main__":
    cli()
