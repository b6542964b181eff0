"""The first step of a run: build every part from the config and check it, before anything trains.

``prepare(cfg)`` returns a ``Job``: the data, the method, the student and the networks the
method learns from (today one teacher), their feature extractors, the optimizer and scheduler
factories, the trainer with its callbacks and loggers, and the checkpoint to resume from. Each
builder checks its own input (``ConfigError`` on the key at fault); the compression callbacks
check themselves against the trainer and the student (``Compression.preflight``). A teacher
that must be trained is not trained here: only its architecture is built, so a bad value
anywhere fails in seconds, not after the teacher's hour.
"""

from __future__ import annotations

import copy
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd.compress.base import Compression, compressions
from kd.data.protocol import DataModule, check_datamodule
from kd.errors import ConfigError, check_int, instantiate_checked
from kd.losses.base import DistillationLoss
from kd.models.build import build_model
from kd.models.features import FeatureExtractor
from kd.models.weights import load_checkpoint, nonfinite_tensor
from kd.results import run_dir_state, task_overrides
from kd.teacher.ensemble import build_ensemble
from kd.teacher.source import multi_process_launch
from kd.training.checkpoints import RunSettings, SafeCheckpointIO, StepSeeds, find_resume, resume_changes
from kd.training.cpu_bf16 import check_cpu_bf16, emulated_bf16
from kd.training.dot import check_dot
from kd.training.finite import FiniteWatch
from kd.training.fit import build_optimization
from kd.training.loggers import continue_history
from kd.training.method import prepare_method
from kd.training.module import check_peers, compile_mode
from kd.training.protocol import apply_protocol
from kd.training.speed import apply_speed

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything one run needs, built and checked.

    Attributes:
        seed: The run's seed (drawn and written into the config when it was null).
        datamodule: The data.
        criterion: The distillation method.
        student: The network to train.
        peers: Networks that train with the student (``model.peers``), by name; empty for one student.
        teacher: The teacher's network, untrained until ``kd.teacher.source.get_teacher``
            gives it weights; None for a method without a teacher.
        features: The student's and the teacher's feature extractors.
        optimization: The optimizer and scheduler factories.
        loggers: Lightning loggers.
        trainer: The student's trainer, with its callbacks, loggers and checkpoint plugin.
        resume: The checkpoint to continue from, or None.
        allow_pickle: Whether checkpoints may need pickle (``checkpoint.allow_pickle``).
        resolved: The config, resolved: what ``results.json`` and the loggers record.
        history: The overrides the run was started with (``overrides``) and, when it was
            resumed, each resume (``resumes``: checkpoint, step, overrides, changed settings).
    """

    seed: int
    datamodule: DataModule
    criterion: DistillationLoss
    student: nn.Module
    peers: dict[str, nn.Module]
    teacher: nn.Module | None
    features: tuple[FeatureExtractor, FeatureExtractor | None]
    optimization: tuple[Callable[..., Any], Callable[..., Any] | None]
    loggers: list[Any]
    trainer: L.Trainer
    resume: Path | None
    allow_pickle: bool
    resolved: dict[str, Any]
    history: dict[str, Any]

    @property
    def compressions(self) -> list[Compression]:
        """The trainer's compression callbacks, in finalization order."""
        return compressions(self.trainer.callbacks)  # type: ignore[attr-defined]


def prepare(cfg: DictConfig) -> Job:
    """Builds and checks every part of the run described by ``cfg`` (see the module docstring).

    Raises:
        ConfigError: On bad input, naming the key; nothing has trained or been written.
    """
    output_dir = Path(cfg.paths.output_dir)
    refused = run_dir_state(output_dir).refusal("paths.output_dir", task_overrides())
    if refused:
        raise refused
    allow_pickle = bool(OmegaConf.select(cfg, "checkpoint.allow_pickle", default=False))
    resume = resume_checkpoint(cfg, output_dir, allow_pickle=allow_pickle)
    saved = load_checkpoint(resume, allow_pickle=allow_pickle, mmap=True) if resume is not None else {}
    if cfg.get("seed") is None and (saved.get("kd") or {}).get("config", {}).get("seed") is not None:
        with open_dict(cfg):  # the seed the interrupted run drew
            cfg.seed = saved["kd"]["config"]["seed"]
    seed = check_seed(cfg)
    apply_protocol(cfg)
    apply_speed(cfg)
    compile_mode(OmegaConf.select(cfg, "speed.compile", default=False))
    FiniteWatch(OmegaConf.select(cfg, "speed.finite_check_every", default=16))  # checked before anything trains
    check_cpu_bf16("trainer", cfg.trainer.get("precision"), cfg.trainer.get("accelerator"), emulated_bf16(cfg))
    if cfg.stages.max_epochs is not None:
        check_int("stages.max_epochs", cfg.stages.max_epochs, 1, valid=">= 1 or null")
    L.seed_everything(seed, workers=True, verbose=False)
    datamodule = check_datamodule(instantiate_checked(cfg.data, "data"))
    criterion = instantiate_checked(cfg.distill, "distill")
    shape = tuple(datamodule.input_shape)
    fits = {"num_classes": datamodule.num_classes, "input_shape": shape}
    student = build_model(cfg.model.student, key="model.student", **fits)
    peers = {name: build_model(node, key=f"model.peers.{name}", **fits) for name, node in peer_configs(cfg, criterion).items()}
    check_peers(criterion, peers)
    teacher = None
    if criterion.requires_teacher:  # model.teachers: an ensemble of frozen teachers, else model.teacher
        teacher = build_ensemble(cfg, criterion, **fits) or build_model(cfg.model.teacher, key="model.teacher", **fits)
    # feature nodes, sample indices and the method's learned parts, before any teacher training
    features = prepare_method(criterion, student, teacher, datamodule, tracer=cfg.features_tracer)
    optimization = build_optimization(cfg)
    loggers = instantiate_group(cfg.get("logger"), "logger")
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    history = resume_history(resume, saved, resolved)
    trainer = instantiate_checked(
        cfg.trainer, "trainer", logger=loggers or False, plugins=[SafeCheckpointIO(allow_pickle=allow_pickle)],
        callbacks=[StepSeeds(seed), RunSettings(resolved, history["overrides"], history["resumes"]),
                   *instantiate_group(cfg.get("callbacks"), "callbacks"), *peer_checkpoints(cfg, peers)],
    )
    check_dot(optimization[0], trainer)
    for cb in compressions(trainer.callbacks):  # type: ignore[attr-defined]
        cb.preflight(trainer, student, reads_features=bool(features[0].nodes), input_shape=shape)
    if resume is not None and rank_zero_only.rank == 0:  # last: a refused run keeps the history whole
        loops = (saved.get("loops") or {}).get("fit_loop") or {}
        continue_history(loggers, output_dir, int(loops.get("epoch_loop.state_dict", {}).get(
            "_batches_that_stepped", saved.get("global_step", 0))))
    return Job(seed, datamodule, criterion, student, peers, teacher, features, optimization, loggers, trainer, resume,
               allow_pickle, resolved, history)


def peer_configs(cfg: DictConfig, criterion: DistillationLoss) -> dict[str, Any]:
    """The model configs of the networks that train with the student (``model.peers``), by name.

    A method of peers given none gets one of the student's architecture, named ``peer`` (DML's
    two networks of one kind), written into ``cfg`` so the record and ``kd-eval`` see it.
    """
    peers = OmegaConf.select(cfg, "model.peers")
    if not peers and criterion.trains_peers:
        with open_dict(cfg):
            cfg.model.peers = {"peer": copy.deepcopy(cfg.model.student)}
        peers = cfg.model.peers
    return dict((peers or {}).items())


def peer_checkpoints(cfg: DictConfig, peers: dict[str, nn.Module]) -> list[ModelCheckpoint]:
    """Each peer's best-validation checkpoint (``val/<name>/acc``, in ``checkpoints/<name>/``), made
    like the student's (``callbacks.model_checkpoint``); none without it."""
    node = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if not peers or node is None:
        return []
    return [instantiate_checked(node, "callbacks.model_checkpoint", monitor=f"val/{name}/acc",
                                dirpath=str(Path(node.dirpath) / name), save_last=False) for name in peers]


def resume_history(resume: Path | None, saved: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    """The overrides the run started with and its resumes, this one included.

    Raises:
        ConfigError: When the checkpoint was written with other settings (``resume_changes``).
    """
    if resume is None:
        return {"overrides": task_overrides(), "resumes": []}
    record = saved.get("kd") or {}
    changed = resume_changes(resume, record.get("config"), resolved)
    this = {"checkpoint": str(resume), "step": int(saved.get("global_step", -1)), "overrides": task_overrides(),
            "changed": changed}
    return {"overrides": list(record.get("overrides", task_overrides())), "resumes": [*record.get("resumes", []), this]}


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


def resume_checkpoint(cfg: DictConfig, output_dir: Path, *, allow_pickle: bool) -> Path | None:
    """The checkpoint ``resume`` names: None for a fresh run.

    Raises:
        ConfigError: For a ``resume`` path that is missing, unreadable or holds NaN or Inf.
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
    state = load_checkpoint(path, allow_pickle=allow_pickle, mmap=True)  # missing, corrupt or pickled: now, not mid-setup
    bad = nonfinite_tensor(state.get("state_dict") or {})
    if bad is not None:
        raise ConfigError("resume", f"{path} holds NaN or Inf in {bad} (written as the run diverged); give an "
                          "earlier checkpoint of the run")
    return path


def stage_strategy(cfg: DictConfig) -> dict[str, str]:
    """The strategy of a preliminary stage's Trainer: the run's, allowing unused parameters.

    A stage trains part of the model (a connector, a paraphraser, the student's body without
    its classifier), which plain DDP refuses.
    """
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy in ("ddp", "ddp_spawn", "ddp_fork"):
        return {"strategy": f"{strategy}_find_unused_parameters_true"}
    return {}


def stage_trainer(cfg: DictConfig) -> Callable[[int], L.Trainer]:
    """Builds the Trainer of a method's preliminary stage for a number of epochs: the run's
    trainer (``stage_strategy``) without checkpoints, loggers or validation."""

    def make(epochs: int) -> L.Trainer:
        return instantiate_checked(
            cfg.trainer, "trainer", max_epochs=min(epochs, cfg.stages.max_epochs or epochs), callbacks=[],
            logger=False, enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
            **stage_strategy(cfg),
        )

    return make
