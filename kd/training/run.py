"""``run(cfg)``: one kd experiment from a composed config to ``results.json``."""

from __future__ import annotations

import logging
import os
import random
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import kd
from kd.compress.base import Compression, compressions
from kd.compress.deploy import deploy_and_report
from kd.compress.report import format_report
from kd.errors import ConfigError, Diverged, check_int, instantiate_checked
from kd.models.build import build_model, count_parameters
from kd.models.features import FeatureExtractor
from kd.models.weights import load_checkpoint
from kd.results import RESULTS_FILE, STUDENT_WEIGHTS, failed_run_error, git_info, save_atomic, summary_table, write_json_atomic
from kd.teacher.cache import TeacherCache, open_cache
from kd.teacher.source import multi_process_launch, resolve_teacher
from kd.training.checkpoints import SafeCheckpointIO, StepSeeds, find_resume
from kd.training.fit import build_optimization, fit
from kd.training.loggers import finish_loggers, start_loggers
from kd.training.method import prepare_method

log = logging.getLogger(__name__)


def _quiet() -> None:
    """Silences warnings that are noise for kd's in-memory data and short runs."""
    for pattern in (
        ".*does not have many workers.*",
        ".*is smaller than the logging interval.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*module\\(s\\) in eval mode at the start of training.*",  # the frozen teacher
    ):
        warnings.filterwarnings("ignore", pattern)


def task_overrides() -> list[str]:
    """The command-line overrides of this run (empty when not started by Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


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


def check_seed(cfg: DictConfig) -> int:
    """The run's seed: ``cfg.seed``, or a fresh one written into ``cfg`` when it is null.

    Raises:
        ConfigError: If the seed is not an integer in ``[0, 2**32)``.
    """
    seed = cfg.get("seed")
    if seed is None and multi_process_launch():
        # every rank must shuffle alike: take rank 0's (Lightning passes it to the ranks it starts)
        if "PL_GLOBAL_SEED" not in os.environ:
            raise ConfigError("seed", "is null in a multi-process launch (torchrun, SLURM tasks), where each "
                              "process would draw its own; give seed=<int>")
        seed = int(os.environ["PL_GLOBAL_SEED"])
        with open_dict(cfg):
            cfg.seed = seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        with open_dict(cfg):
            cfg.seed = seed
        log.info("seed=null: drew seed %d (recorded in results.json)", seed)
    return check_int("seed", seed, 0, 2**32, valid="in [0, 2**32)")


def stage_strategy(cfg: DictConfig) -> dict[str, str]:
    """The strategy of a preliminary stage's Trainer: the run's, allowing unused parameters.

    A stage trains part of the model (a connector, a paraphraser, the student's body without
    its classifier), which plain DDP refuses.
    """
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy in ("ddp", "ddp_spawn", "ddp_fork"):
        return {"strategy": f"{strategy}_find_unused_parameters_true"}
    return {}


def instantiate_group(node: DictConfig | None, key: str) -> list[Any]:
    """Instantiates each named entry of a group of objects (``callbacks``, ``logger``), in order.

    A compression callback learns its config key (``callbacks.prune``) for its error messages.
    """
    objects = []
    for name, value in (node or {}).items():
        if value is None:
            continue
        obj = instantiate_checked(value, f"{key}.{name}")
        if isinstance(obj, Compression):
            obj.key = f"{key}.{name}"
        objects.append(obj)
    return objects


def check_compression(
    callbacks: list[Compression], trainer: L.Trainer, student: Any, *, reads_features: bool, input_shape: tuple[int, ...]
) -> None:
    """Each compression callback's own checks, then whether they can run together in this trainer.

    Raises:
        ConfigError: Before training, for a callback that cannot work on this run; a callback
            that replaces parameters (structured pruning) with another one; early stopping,
            which could end training before the student has its final form; several devices.
    """
    if not callbacks:
        return
    names = ", ".join(cb.key for cb in callbacks)
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 1:
        raise ConfigError("trainer.max_epochs", f"is {max_epochs}; {names} schedule by epoch: set it to >= 1")
    if trainer.world_size > 1:
        raise ConfigError("trainer.devices", f"{names} run on one device (got {trainer.world_size} processes): "
                          "set trainer.devices=1")
    if any(isinstance(cb, EarlyStopping) for cb in trainer.callbacks):  # type: ignore[attr-defined]
        raise ConfigError("callbacks", f"early stopping could end training before {names} finish; "
                          "drop it (callbacks=[default,...]): checkpoints are selected on val among compressed epochs")
    for cb in callbacks:
        cb.check(student, max_epochs=int(max_epochs), reads_features=reads_features, input_shape=input_shape)
    for cb in callbacks:
        others = [o for o in callbacks if o is not cb]
        if cb.changes_parameters and others:
            raise ConfigError(
                f"{others[0].key}", f"cannot run with {cb.key}, which replaces the student's parameters; "
                "structured pruning combines with nothing else yet (run it alone)"
            )


def teacher_cache(cfg: DictConfig, teacher_fx: FeatureExtractor | None, datamodule: Any, trainer: L.Trainer) -> TeacherCache:
    """Opens (building when missing) the cache of the teacher's outputs on the training split.

    Built on the run's GPU when it has one, before training, by one process: inside a
    multi-process launch a missing cache is refused, as a missing teacher is.

    Raises:
        ConfigError: See ``kd.teacher.cache.open_cache``.
    """
    assert teacher_fx is not None
    node = cfg.teacher_cache
    datamodule.setup("fit")
    device = trainer.strategy.root_device
    return open_cache(
        teacher_fx, datamodule.splits["train"] if hasattr(datamodule, "splits") else None, node.dir,
        dtype=node.dtype, top_k=node.top_k, batch_size=int(node.batch_size), num_workers=node.num_workers,
        max_gb=float(node.max_gb), verify=int(node.verify),
        device=device if device.type == "cuda" else "cpu", build=not multi_process_launch(), data_key="data",
    )


def resume_checkpoint(cfg: DictConfig, output_dir: Path, *, allow_pickle: bool) -> Path | None:
    """The checkpoint ``resume`` names: None for a fresh run.

    Raises:
        ConfigError: For a ``resume`` path that is missing or unreadable.
    """
    resume = cfg.get("resume")
    if resume is None:
        return None
    if str(resume) == "auto":
        found = find_resume(output_dir, allow_pickle=allow_pickle)
        if found is None:
            log.info("resume=auto: %s has no readable checkpoint; starting from scratch", output_dir)
        else:
            log.info("resume=auto: continuing from %s", found)
        return found
    path = Path(str(resume))
    load_checkpoint(path, allow_pickle=allow_pickle, mmap=True)  # missing, corrupt or pickled: now, not mid-setup
    return path


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one experiment: builds and checks everything, gets a teacher, trains, tests, reports.

    Every input is checked before anything trains: the data and method hyperparameters, the
    models against the data, the teacher checkpoint. A teacher that is needed but neither given
    nor stored is trained first (see ``kd.teacher.source``).

    Args:
        cfg: A config composed from ``conf/train.yaml``.

    Returns:
        The content of ``results.json``.

    Raises:
        ConfigError: On bad input, before training starts.
    """
    start = time.time()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _quiet()
    check_launch(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if (output_dir / RESULTS_FILE).exists():
        failed = failed_run_error(output_dir / RESULTS_FILE)
        if failed:
            raise ConfigError("paths.output_dir", f"{output_dir} holds a run that failed ({failed}); resuming it would "
                              "fail again: fix the cause and give the run a new directory (hydra.run.dir=...)")
        raise ConfigError(
            "paths.output_dir", f"{output_dir} already holds the {RESULTS_FILE} of another run; "
            "give the run a new directory (hydra.run.dir=...)"
        )
    seed = check_seed(cfg)
    if cfg.stages.max_epochs is not None:
        check_int("stages.max_epochs", cfg.stages.max_epochs, 1, valid=">= 1 or null")
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = instantiate_checked(cfg.data, "data")
    criterion = instantiate_checked(cfg.distill, "distill")
    shape = tuple(datamodule.input_shape)
    fits = {"num_classes": datamodule.num_classes, "input_shape": shape}
    student = build_model(cfg.model.student, key="model.student", **fits)
    teacher = build_model(cfg.model.teacher, key="model.teacher", **fits) if criterion.requires_teacher else None
    # feature nodes, sample indices and the method's learned parts, before any teacher training
    features = prepare_method(criterion, student, teacher, datamodule, tracer=cfg.features_tracer)
    optimization = build_optimization(cfg)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    allow_pickle = bool(OmegaConf.select(cfg, "checkpoint.allow_pickle", default=False))
    resume = resume_checkpoint(cfg, output_dir, allow_pickle=allow_pickle)
    trainer = instantiate_checked(
        cfg.trainer, "trainer", callbacks=[StepSeeds(seed), *instantiate_group(cfg.get("callbacks"), "callbacks")],
        logger=loggers or False, plugins=[SafeCheckpointIO(allow_pickle=allow_pickle)],
    )
    compress = compressions(trainer.callbacks)
    check_compression(compress, trainer, student, reads_features=bool(features[0].nodes), input_shape=shape)

    teacher_info = None
    if teacher is not None:
        teacher, teacher_info = resolve_teacher(cfg, datamodule, net=teacher)

    cache = None
    if teacher is not None and cfg.teacher_cache.enabled:
        cache = teacher_cache(cfg, features[1], datamodule, trainer)

    # Data order and dropout must not depend on whether the teacher was trained in this run.
    L.seed_everything(seed, workers=True, verbose=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    start_loggers(loggers, resolved)

    def header(status: str) -> dict[str, Any]:
        """The fields of every ``results.json``, of a completed run or a failed one."""
        return {
            "kd_version": kd.__version__, "git": git_info(), "status": status, "started_at": started_at,
            "wall_time_s": round(time.time() - start, 2), "run_dir": str(output_dir), "overrides": task_overrides(),
            "method": type(criterion).__name__, "seed": seed,
        }

    try:
        result = fit(
            student=student, criterion=criterion, datamodule=datamodule, teacher=teacher,
            trainer=trainer, optimization=optimization, features=features,
            make_stage_trainer=lambda epochs: instantiate_checked(
                cfg.trainer, "trainer", max_epochs=min(epochs, cfg.stages.max_epochs or epochs), callbacks=[],
                logger=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                **stage_strategy(cfg),
            ),
            teacher_cache=cache, channels_last=bool(cfg.speed.channels_last), compile=bool(cfg.speed.compile),
            resume=resume,
        )
    except Diverged as e:
        if trainer.is_global_zero:
            failed = {
                **header("failed"), "error": str(e), "diverged": e.as_dict(),
                "last_good_checkpoint": str(find_resume(output_dir, allow_pickle=allow_pickle) or ""), "config": resolved,
            }
            write_json_atomic(output_dir / RESULTS_FILE, failed)  # kd-table lists the run as failed, with the error
        raise
    weights = output_dir / STUDENT_WEIGHTS
    student = result.module.student  # the compression callbacks may have replaced it
    test_size = len(datamodule.test_dataloader().dataset)
    for metrics in (result.metrics, result.final_metrics):  # misclassified test images, as papers count them
        if "test/acc" in metrics:
            metrics["test/errors"] = round((1.0 - metrics["test/acc"]) * test_size)
    results = {
        **header("completed"),
        "world_size": trainer.world_size,
        "data": {
            "name": type(datamodule).__name__, "num_classes": datamodule.num_classes, "input_shape": list(shape),
            "test_size": test_size,
        },
        "teacher": teacher_info.as_dict() if teacher_info else None,
        "stages": result.stages,
        "student": {
            "params": count_parameters(student),
            "weights": str(weights),
            "selected": result.selected,
            "best_epoch": result.best_epoch,
            "epochs": result.epochs,
            "checkpoint": result.best_checkpoint,
            "metrics": result.metrics,
            "final_metrics": result.final_metrics,
        },
        "config": resolved,
    }
    if trainer.is_global_zero:
        # the selected student alone, as trained: no teacher, no auxiliary modules of the method
        save_atomic(student.state_dict(), weights)
        write_json_atomic(output_dir / RESULTS_FILE, results)  # kept even if the report fails below
        print(summary_table(results), flush=True)
        if cfg.report.enabled:
            report = cfg.report
            limit = trainer.limit_test_batches
            try:
                results["report"] = deploy_and_report(
                    student=student, teacher=teacher, student_test_acc=result.metrics.get("test/acc"),
                    teacher_test_acc=teacher_info.metrics.get("test/acc") if teacher_info else None,
                    callbacks=compress, datamodule=datamodule, input_shape=shape, output_dir=output_dir,
                    batch_sizes=list(report.latency.batch_sizes), warmup=report.latency.warmup,
                    repeats=report.latency.repeats, onnx=report.onnx, measure_teacher=report.teacher,
                    test_batches=limit if isinstance(limit, int) else None,
                )
            except Exception as e:  # noqa: BLE001 - training is done; its results must survive
                log.exception("the compression report failed")
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                results["report"] = {"error": f"{type(e).__name__}: {first}"}
            results["wall_time_s"] = round(time.time() - start, 2)
            write_json_atomic(output_dir / RESULTS_FILE, results)
            if "error" in results["report"]:
                print(f"compression report failed: {results['report']['error']} (results.json has the rest)", flush=True)
            else:
                print(format_report(results["report"]), flush=True)
    finish_loggers(loggers, results)
    return results
