"""SLURM clusters through hydra-submitit-launcher (``hydra/launcher=slurm``): the checks made before submitting.

conf/hydra/launcher/slurm.yaml ties the SLURM request to the trainer: ``nodes`` is
``trainer.num_nodes``, ``tasks_per_node`` and ``gpus_per_node`` are ``trainer.devices``. srun starts
one process per task and Lightning's ``SLURMEnvironment`` makes each one a DDP rank, refusing a
job whose ``--ntasks-per-node`` differs from ``trainer.devices`` or whose ``--nodes`` differs from
``trainer.num_nodes``. Lightning finds such a mistake only once the job has waited in the queue
and started; ``CheckSlurmLaunch`` finds it on the login node, before ``sbatch`` runs.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from kd.errors import ConfigError

# Config keys that decide a job's SLURM request; the launcher asks the same for every job of a sweep.
RESOURCE_KEYS = ("trainer", "trainer.devices", "trainer.num_nodes")
# Strategies that start their own processes: under srun, which starts one per device, they would start n x n.
SPAWNING = ("ddp_spawn", "ddp_fork", "ddp_notebook")


def is_slurm_launcher(hydra_cfg: DictConfig) -> bool:
    """Whether ``hydra.launcher`` is submitit's SLURM launcher (``hydra/launcher=slurm`` or ``submitit_slurm``)."""
    target = str(hydra_cfg.launcher.get("_target_", ""))
    return "submitit" in target and target.endswith("SlurmLauncher")


def device_count(devices: Any) -> int | None:
    """The number of devices per node that ``trainer.devices`` names, or None when it does not name one.

    ``-1`` and ``"auto"`` mean "what the node has", which cannot size a SLURM request.
    """
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices) or None
    if isinstance(devices, str):
        if "," in devices:  # "0,1": Lightning's list of GPU indices
            return len([d for d in devices.split(",") if d.strip()]) or None
        devices = int(devices) if devices.strip().isdigit() else None
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    return None


def _swept_resource(cfg: DictConfig) -> tuple[str, str] | None:
    """The first of ``RESOURCE_KEYS`` this sweep varies, with its values as given, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(cfg.hydra.overrides.task))
    fixed = {o.key_or_group for o in overrides if not o.is_sweep_override()}
    for o in overrides:
        if o.is_sweep_override() and o.key_or_group in RESOURCE_KEYS:
            return o.key_or_group, o.input_line
    params = cfg.hydra.sweeper.get("params") or {}
    for key in RESOURCE_KEYS:
        if key in params and key not in fixed:
            return key, f"{key}: {params[key]} in hydra.sweeper.params"
    return None


def _launcher_value(launcher: DictConfig, key: str) -> Any:
    """``hydra.launcher.<key>`` resolved, or the raw value when it cannot be (``auto`` into an int field)."""
    try:
        return launcher[key]
    except OmegaConfBaseException:
        return launcher._get_node(key)._value()


def check_slurm_launch(cfg: DictConfig) -> None:
    """Checks that a sweep on submitit's SLURM launcher asks SLURM for what Lightning will use.

    Does nothing for other launchers.

    Args:
        cfg: The composed multirun config, with its ``hydra`` node.

    Raises:
        ConfigError: When ``trainer.devices`` is not a number of devices (``-1``, ``auto``); when
            ``hydra.launcher.tasks_per_node`` or ``nodes`` is not a positive integer or differs
            from ``trainer.devices`` / ``trainer.num_nodes``; when the sweep varies them (the
            launcher submits every job with the same request); for a strategy that spawns its own
            processes; for a GPU trainer without GPUs requested.
    """
    if not is_slurm_launcher(cfg.hydra):
        return
    launcher = cfg.hydra.launcher
    swept = _swept_resource(cfg)
    if swept is not None:
        raise ConfigError(
            swept[0], f"is swept ({swept[1]}), but the SLURM launcher submits every job of a sweep with the "
            "same nodes and tasks: run one sweep per value"
        )
    devices = cfg.trainer.get("devices", "auto")
    count = device_count(devices)
    if count is None:
        raise ConfigError(
            "trainer.devices", f"is {devices!r}, but a SLURM job needs the number of devices per node, one "
            "SLURM task each (hydra.launcher.tasks_per_node): give it, e.g. trainer.devices=4"
        )
    num_nodes = cfg.trainer.get("num_nodes", 1)
    for key, expected, source in (("tasks_per_node", count, "trainer.devices"), ("nodes", num_nodes, "trainer.num_nodes")):
        value = _launcher_value(launcher, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"hydra.launcher.{key}", f"must be a positive integer, got {value!r} (it follows {source})")
        if value != expected:
            raise ConfigError(
                f"hydra.launcher.{key}", f"is {value} but {source} is {expected}: Lightning's SLURM environment "
                f"needs them equal (one task per device); leave hydra.launcher.{key} unset, it follows {source}"
            )
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy.startswith(SPAWNING):
        raise ConfigError(
            "trainer.strategy", f"{strategy} starts its own processes, but under SLURM srun starts one per "
            "device: use trainer.strategy=ddp (trainer=ddp)"
        )
    gpus = [_launcher_value(launcher, k) for k in ("gpus_per_node", "gpus_per_task", "gres") if k in launcher]
    if str(cfg.trainer.get("accelerator")) in ("gpu", "cuda") and all(g is None for g in gpus):
        raise ConfigError(
            "hydra.launcher.gpus_per_node", "is null, so SLURM allocates no GPU to a trainer with "
            "accelerator=gpu: use hydra/launcher=slurm (not slurm_cpu), or trainer=cpu"
        )


class CheckSlurmLaunch(Callback):
    """Runs ``check_slurm_launch`` before a sweep submits anything (registered in conf/hydra/default.yaml).

    Without ``-m`` Hydra does not use the launcher and the run would start on this machine (the
    login node), so a single run with the SLURM launcher selected is refused too. Exits with
    status 2 and one line on stderr, like every kd input error.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_slurm_launcher(config.hydra):
            self._exit(ConfigError(
                "hydra/launcher", "the SLURM launcher submits jobs only in a multirun: add -m "
                "(kd-train -m hydra/launcher=slurm ...); without it the run would start here"
            ))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_slurm_launch(config)
        except ConfigError as e:
            self._exit(e)

    @staticmethod
    def _exit(error: ConfigError) -> None:
        print(f"kd-train: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
