"""``kd-train``: the Hydra command line of kd. ``python -m kd.cli.train`` is the same.

Examples:
    kd-train                                       # the default experiment (digits, Hinton KD)
    kd-train distill=kd distill.temperature=8 distill.weight=0.5 distill.ce_weight=0.5 trainer.max_epochs=5
    kd-train -m distill=none,kd seed=0,1           # a sweep
    kd-train --help                                # the config groups and their options
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, ListConfig

from kd.cli import config_dir
from kd.cli.quiet import one_console_for_lightning
from kd.errors import ConfigError, Diverged, Terminated
from kd.results import run_dir_state


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_launch(cfg: DictConfig) -> None:
    """Refuses a Hydra multirun with a strategy that re-launches the script in every rank.

    Lightning's ``ddp`` starts ranks 1..n by running the command again; inside a local
    multirun each rank would then run the whole sweep (with a search sweeper, with different
    hyperparameters). ``ddp_spawn`` forks inside the job instead; a SLURM launcher (submitit)
    starts the ranks itself, one job per DDP group, which is fine.

    Raises:
        ConfigError: For ``ddp`` (and its variants other than spawn/fork) in a local multirun.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return
    strategy = str(cfg.trainer.get("strategy", "auto"))
    devices = cfg.trainer.get("devices", "auto")
    one_device = devices in (1, "1") or (devices == "auto" and cfg.trainer.get("accelerator") == "cpu") or (
        isinstance(devices, (list, ListConfig)) and len(devices) == 1
    )
    several = not one_device or int(cfg.trainer.get("num_nodes", 1)) > 1
    # "auto" with several devices becomes Lightning's script-relaunching "ddp"
    relaunches = (strategy == "auto" and several) or (
        strategy.startswith("ddp") and not strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook"))
    )
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if hydra_cfg.mode == RunMode.MULTIRUN and relaunches and "submitit" not in launcher:
        raise ConfigError(
            "trainer.strategy", f"{strategy} re-runs the command in every rank, so each rank would "
            "re-run the whole sweep; use trainer.strategy=ddp_spawn in a multirun, or a SLURM "
            "launcher (one job per DDP group)"
        )


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Runs ``run(cfg)``; returns the selected student's ``val/acc``, the objective of a search sweeper.

    A single run's ConfigError is one line on stderr and exit status 2; a divergence
    (``kd.errors.Diverged``) one line and status 1; SIGTERM (``kd.errors.Terminated``) one line
    and status 143, in a multirun too (the sweep stops). In a multirun the error is one line too,
    then raised for Hydra: the sweep goes on with the next job (Hydra exits non-zero at the end;
    Optuna counts the trial as failed), and ``kd-table`` lists the failed job (``run`` left its
    record in the job's directory).
    """
    try:
        check_launch(cfg)  # about the whole sweep, not this job: stop it at once
    except ConfigError as e:
        print(f"kd-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    state = run_dir_state(cfg.paths.output_dir)
    if str(cfg.get("resume")) == "auto" and state.status == "completed":
        # an interrupted sweep run again with resume=auto: its finished jobs are not redone
        print(f"kd-train: resume=auto: {cfg.paths.output_dir} is finished; skipped", file=sys.stderr, flush=True)
        return (state.results or {}).get("student", {}).get("metrics", {}).get("val/acc")
    from kd.training.run import run  # the training stack: not imported for --help or a config error

    one_console_for_lightning()

    try:
        results = run(cfg)
    except Terminated as e:  # a SystemExit: a sweep stops too, as its process was told to
        print(f"kd-train: {e}", file=sys.stderr, flush=True)
        raise
    except (ConfigError, Diverged) as e:
        multirun = _in_multirun()
        where = f" ({cfg.paths.output_dir})" if multirun else ""
        kind = "error" if isinstance(e, ConfigError) else "diverged"
        print(f"kd-train: {kind}{where}: {e}", file=sys.stderr, flush=True)
        if not multirun:
            sys.exit(2 if isinstance(e, ConfigError) else 1)
        raise
    return results["student"]["metrics"].get("val/acc")


def cli() -> None:
    """The ``kd-train`` command: ``main`` with one-line errors for configs Hydra cannot compose.

    The console shows kd's progress and results; ``-v`` (``--verbose``) adds what the libraries
    under kd log and warn (``kd.cli.quiet``).
    """
    from kd.cli.compose_errors import run_app
    from kd.cli.quiet import quiet

    sys.argv[1:] = quiet(sys.argv[1:])
    run_app(main, "kd-train")


if __name__ == "__main__":
    cli()
