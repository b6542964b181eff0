"""One training run of a DistillationModule, shared by student runs and teacher runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torch import nn

from kd.losses.base import DistillationLoss
from kd.module import DistillationModule

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
    """

    metrics: dict[str, float]
    final_metrics: dict[str, float]
    selected: str
    best_checkpoint: str | None
    best_epoch: int | None
    epochs: int
    module: DistillationModule = field(repr=False)


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def evaluate(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule) -> dict[str, float]:
    """Val and test metrics of a module as it is, with the run's trainer settings and no logging."""
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    val = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    return {**_floats(val, "val/"), **_floats(test, "test/")}


def fit(
    cfg: DictConfig,
    *,
    student: nn.Module,
    criterion: DistillationLoss,
    datamodule: L.LightningDataModule,
    teacher: nn.Module | None,
    callbacks: list[Callback],
    loggers: list[Any],
) -> FitResult:
    """Trains, then tests the final weights and the best-validation checkpoint.

    Model selection never looks at the test set: the checkpoint is chosen on ``val``, and both
    the final-epoch and the selected weights are tested once, at the end.

    Args:
        cfg: The composed run config (``optimizer``, ``scheduler``, ``trainer`` are read).
        student: The network to train, already built for the data.
        criterion: The distillation method.
        datamodule: The data.
        teacher: The frozen teacher, or None.
        callbacks: Lightning callbacks.
        loggers: Lightning loggers (may be empty).

    Returns:
        The measured metrics and the trained module.
    """
    scheduler = cfg.get("scheduler")
    module = DistillationModule(
        student=student,
        criterion=criterion,
        optimizer=instantiate(cfg.optimizer),
        num_classes=datamodule.num_classes,
        teacher=teacher,
        scheduler=instantiate(scheduler) if scheduler else None,
    )
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    trainer.fit(module, datamodule=datamodule)
    final_val = _floats(trainer.callback_metrics, "val/")
    final_test = _floats(trainer.test(module, datamodule=datamodule, verbose=False)[0], "test/")
    final = {**final_val, **final_test}

    ckpt = trainer.checkpoint_callback
    best_path = ckpt.best_model_path if isinstance(ckpt, ModelCheckpoint) else ""
    if not best_path or ckpt.monitor is None:
        return FitResult(final, final, "final", None, None, trainer.current_epoch, module)
    val = trainer.validate(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)[0]
    test = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)[0]
    best_epoch = _checkpoint_epoch(best_path)
    log.info("selected %s (epoch %s) on %s", Path(best_path).name, best_epoch, ckpt.monitor)
    return FitResult(
        {**_floats(val, "val/"), **_floats(test, "test/")},
        final, "best_val", best_path, best_epoch, trainer.current_epoch, module,
    )


def _checkpoint_epoch(path: str) -> int | None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads no weights
    return int(state["epoch"]) if "epoch" in state else None
