"""One training run of a DistillationModule, shared by student runs and teacher runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import nn

from kd.compress.base import compressions
from kd.errors import ConfigError, check_int, instantiate_checked
from kd.losses.base import DistillationLoss
from kd.models.features import FeatureExtractor
from kd.models.weights import load_checkpoint, state_dict_mismatch
from kd.teacher.cache import TeacherCache
from kd.training.module import ENSEMBLE, DistillationModule
from kd.training.stages import run_stages

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What one run measured.

    Attributes:
        metrics: Val and test metrics of the selected weights: the checkpoint with the best
            validation score when there is one, else the final weights.
        final_metrics: Val and test metrics of the weights after the last epoch.
        selected: ``"best_val"`` or ``"final"``: which weights ``metrics`` describe.
        best_checkpoint: Path of the best-validation checkpoint, or None.
        best_epoch: Epoch of that checkpoint, or None.
        epochs: Epochs trained.
        module: The trained module, holding the selected weights.
        stages: What the method's preliminary stages did (``kd.training.stages.run_stages``).
        peers: For each peer (``model.peers``), the same as the student's: ``selected``,
            ``best_epoch``, ``checkpoint``, ``metrics`` (of its own best-validation checkpoint,
            ``val/<name>/acc``), ``final_metrics``; and ``state_dict``, its selected weights.
        ensemble: The peers' and the student's ensemble (the mean of their probabilities):
            ``metrics`` at the student's selected checkpoint, ``final_metrics`` after the last epoch.
    """

    metrics: dict[str, float]
    final_metrics: dict[str, float]
    selected: str
    best_checkpoint: str | None
    best_epoch: int | None
    epochs: int
    module: DistillationModule = field(repr=False)
    stages: list[dict[str, Any]] = field(default_factory=list)
    peers: dict[str, dict[str, Any]] = field(default_factory=dict)
    ensemble: dict[str, dict[str, float]] = field(default_factory=dict)


def build_optimization(cfg: DictConfig, prefix: str = "") -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """The optimizer and scheduler factories of a config, checked by a dry run.

    The factories are called on a dummy parameter and the scheduler is stepped through every
    epoch, so a bad learning rate or schedule (``T_max=0``) fails now, not after an epoch.

    Args:
        cfg: A config with ``optimizer`` and (optionally) ``scheduler`` nodes.
        prefix: Where those nodes sit, for error messages (``teacher.recipe.``).

    Raises:
        ConfigError: When either cannot be built or used, or the epochs are not an integer >= 1.
    """
    epochs = cfg.trainer.max_epochs
    check_int(f"{prefix}max_epochs" if prefix else "trainer.max_epochs", epochs, 1, valid=">= 1")
    optimizer = instantiate_checked(cfg.optimizer, f"{prefix}optimizer")
    node = cfg.get("scheduler")
    scheduler = instantiate_checked(node, f"{prefix}scheduler") if node else None
    param = nn.Parameter(torch.zeros(1))
    try:
        opt = optimizer([param])
    except Exception as e:
        raise ConfigError(f"{prefix}optimizer", f"{type(e).__name__}: {e}") from e
    if scheduler is not None:
        try:
            sched = scheduler(opt)
            for _ in range(epochs):
                opt.step()
                sched.step()
        except Exception as e:
            raise ConfigError(f"{prefix}scheduler", f"fails when stepped: {type(e).__name__}: {e}") from e
    return optimizer, scheduler


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def evaluate(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: str | None = None) -> dict[str, float]:
    """Val and test metrics of a module's current weights, or of a checkpoint's."""
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    test = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    return {**_floats(val, "val/"), **_floats(test, "test/")}


def fit(
    *,
    student: nn.Module,
    criterion: DistillationLoss,
    datamodule: L.LightningDataModule,
    teacher: nn.Module | None,
    trainer: L.Trainer,
    optimization: tuple[Callable[..., Any], Callable[..., Any] | None],
    features: tuple[FeatureExtractor, FeatureExtractor | None] | None = None,
    make_stage_trainer: Callable[[int], L.Trainer] | None = None,
    teacher_cache: TeacherCache | None = None,
    channels_last: bool = False,
    compile: bool | str = False,
    fused_optimizer: bool = False,
    resume: Path | None = None,
    peers: dict[str, nn.Module] | None = None,
    finite_check_every: int = 16,
) -> FitResult:
    """Trains, then evaluates the final weights and the best-validation checkpoint.

    Model selection never looks at the test set: the checkpoint is chosen on ``val``, and both
    the final-epoch and the selected weights are tested once, at the end.

    Args:
        student: The network to train, already built for the data.
        criterion: The distillation method.
        datamodule: The data.
        teacher: The frozen teacher, or None.
        trainer: The Lightning trainer, with its callbacks and loggers.
        optimization: The optimizer and scheduler factories, from ``build_optimization``.
        features: The student's and teacher's feature extractors from
            ``kd.training.method.prepare_method``; None when the method reads logits only.
        make_stage_trainer: Builds the Trainer of a preliminary stage for a number of epochs;
            needed when the method has stages.
        teacher_cache: The teacher's stored outputs (``kd.teacher.cache``), read instead of running it.
        channels_last: Channels-last memory layout for conv nets and image batches.
        compile: ``torch.compile`` the student's and teacher's forward (True or a torch.compile mode).
        fused_optimizer: The optimizer's fused kernel on a GPU.
        resume: A checkpoint of this run to continue from (``kd.training.checkpoints``): weights,
            optimizer, scheduler, callbacks, random generators and the position in the epoch.
        peers: Networks that train with the student (``DistillationModule``'s ``peers``).
        finite_check_every: Steps between two reads of the divergence guard (``kd.training.finite``).

    Returns:
        The measured metrics and the trained module.
    """
    optimizer, scheduler = optimization
    student_fx, teacher_fx = features or (None, None)
    module = DistillationModule(
        student=student, criterion=criterion, optimizer=optimizer,
        num_classes=datamodule.num_classes, teacher=teacher, scheduler=scheduler,
        student_features=student_fx, teacher_features=teacher_fx, teacher_cache=teacher_cache,
        channels_last=channels_last, compile=compile, peers=peers, finite_check_every=finite_check_every,
        fused_optimizer=fused_optimizer,
    )
    stages = criterion.stages()
    report: list[dict[str, Any]] = []
    if stages:
        if make_stage_trainer is None:
            raise ValueError(f"{type(criterion).__name__} has stages but no make_stage_trainer was given")
        report = run_stages(
            stages, student_features=module.student_features, teacher_features=module.teacher_features,
            datamodule=datamodule, optimizer=optimizer, make_trainer=make_stage_trainer,
        )
    if resume is not None:
        check_resumable(module, resume, trainer)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume is not None else None)
    except Exception as e:  # a step that failed on weights a NaN had reached: the NaN is the cause
        module.finite.check()
        raise e
    park_hpc_checkpoints(trainer)
    epochs = _epochs_trained(trainer)
    final, final_peers = split_peer_metrics(evaluate(trainer, module, datamodule), module.peers)
    selected_peers = select_peers(trainer, module, datamodule, final_peers)  # before the student's: last loaded

    ckpt = trainer.checkpoint_callback
    best_path = ckpt.best_model_path if isinstance(ckpt, ModelCheckpoint) and ckpt.monitor else ""
    if not best_path:
        ensemble = {"metrics": final_peers.get(ENSEMBLE, {}), "final_metrics": final_peers.get(ENSEMBLE, {})}
        return FitResult(final, final, "final", None, None, epochs, module, report, selected_peers,
                         ensemble if module.peers else {})
    best, best_peers = split_peer_metrics(evaluate(trainer, module, datamodule, ckpt_path=best_path), module.peers)
    if trainer.world_size > 1:  # ddp_spawn/ddp_fork restored the checkpoint in their workers only
        checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(checkpoint)  # the teacher, left out of checkpoints
        module.load_state_dict(checkpoint["state_dict"])
    best_epoch = _checkpoint_epoch(best_path)
    log.info("selected %s (epoch %s) on %s", Path(best_path).name, best_epoch, ckpt.monitor)
    ensemble = {"metrics": best_peers.get(ENSEMBLE, {}), "final_metrics": final_peers.get(ENSEMBLE, {})}
    return FitResult(best, final, "best_val", best_path, best_epoch, epochs, module, report, selected_peers,
                     ensemble if module.peers else {})


def split_peer_metrics(metrics: dict[str, float], peers: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The student's metrics (``val/acc``), and each peer's and the ensemble's (``val/<name>/acc``)
    by name, as ``val/acc``."""
    names = [*peers, ENSEMBLE] if len(peers) else []
    own = {k: v for k, v in metrics.items() if k.split("/")[1] not in names or k.count("/") < 2}
    by_name = {name: {k.replace(f"/{name}/", "/", 1): v for k, v in metrics.items() if k.split("/")[1] == name
                      and k.count("/") == 2} for name in names}
    return own, by_name


def select_peers(trainer: L.Trainer, module: DistillationModule, datamodule: L.LightningDataModule,
                 final: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each peer's selected weights and metrics: of its own best-validation checkpoint
    (``kd.training.prepare.peer_checkpoints``) when it has one, else its final weights."""
    selected: dict[str, dict[str, Any]] = {}
    for name, net in module.peers.items():
        final_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        entry = {"selected": "final", "best_epoch": None, "checkpoint": None, "metrics": final[name],
                 "final_metrics": final[name], "state_dict": final_state}
        path = next((cb.best_model_path for cb in trainer.callbacks  # type: ignore[attr-defined]
                     if isinstance(cb, ModelCheckpoint) and cb.monitor == f"val/{name}/acc" and cb.best_model_path), "")
        if path:
            metrics = split_peer_metrics(evaluate(trainer, module, datamodule, ckpt_path=path), module.peers)[1][name]
            prefix = f"peers.{name}."
            state = load_checkpoint(path, mmap=True)["state_dict"]
            entry.update(selected="best_val", best_epoch=_checkpoint_epoch(path), checkpoint=path, metrics=metrics,
                         state_dict={k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        selected[name] = entry
    return selected


def park_hpc_checkpoints(trainer: L.Trainer) -> None:
    """Moves Lightning's SLURM requeue checkpoints (``hpc_ckpt_<n>.ckpt``) into ``checkpoints/``.

    Under SLURM, Lightning loads the newest ``hpc_ckpt_*`` of the run directory whenever it is
    given no ``ckpt_path``, in ``validate`` and ``test`` too: left in place after training, it
    would be evaluated instead of the final weights. Renamed ``checkpoints/hpc-step<k>.ckpt``,
    it is kept, and ``resume=auto`` still finds it.
    """
    if not trainer.is_global_zero:
        return
    root = Path(trainer.default_root_dir)
    for path in root.glob("hpc_ckpt_*.ckpt"):
        try:
            step = int(load_checkpoint(path, mmap=True).get("global_step", -1))
        except ConfigError:  # corrupt or pickled: moved all the same
            step = -1
        target = root / "checkpoints" / f"hpc-step{step}-{path.stem.rsplit('_', 1)[-1]}.ckpt"
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        log.info("moved %s to %s (consumed by the resumed run)", path.name, target)


def check_resumable(module: DistillationModule, path: Path, trainer: L.Trainer) -> None:
    """Refuses, before training, a checkpoint whose weights do not fit this run's modules.

    Raises:
        ConfigError: Naming the first mismatched, missing or unexpected entries.
    """
    allow_pickle = bool(getattr(trainer.strategy.checkpoint_io, "allow_pickle", False))
    state = load_checkpoint(path, allow_pickle=allow_pickle, mmap=True)
    epoch = int(state.get("epoch", -1))
    for cb in compressions(trainer.callbacks):  # type: ignore[attr-defined]
        cb.check_resume(str(path), epoch)
    saved = {k: v for k, v in state.get("state_dict", {}).items() if not k.startswith("teacher.")}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    details = state_dict_mismatch(saved, own, saved_as="in the checkpoint", own_as="here", keys=lambda ks: f"e.g. {ks[0]}")
    if details:
        raise ConfigError("resume", f"{path} is a checkpoint of another model or method: {details}; "
                          "resume with the command that wrote it")


def _epochs_trained(trainer: L.Trainer) -> int:
    """Epochs trained. Under ddp_spawn/ddp_fork the loops ran in worker processes and the main
    process's counters are still 0; the module's ``train/epochs`` came back with the metrics."""
    return trainer.current_epoch or int(trainer.callback_metrics.get("train/epochs", 0))


def _checkpoint_epoch(path: str) -> int | None:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads no weights
    return int(state["epoch"]) if "epoch" in state else None
