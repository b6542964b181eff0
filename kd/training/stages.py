"""Runs the preliminary stages a method declares (``DistillationLoss.stages()``), all the same way.

FT trains its paraphraser on the teacher's features first; AB and FSP first train the student's
feature layers with connectors to imitate the teacher. Each stage is a short Lightning fit of
``StageModule`` over the training data: the run's optimizer (without its scheduler) on the
stage's modules (and the student when the stage says so), the teacher frozen. The training loop
itself has no method-specific branch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import Stage
from kd.models.features import FeatureExtractor
from kd.outputs import Batch

log = logging.getLogger(__name__)


class StageModule(L.LightningModule):
    """Trains what one stage trains, with the stage's loss.

    Args:
        stage: The stage.
        student_features: The student's feature extractor.
        teacher_features: The teacher's feature extractor (the teacher stays frozen).
        optimizer: ``partial`` of the run's optimizer, called with the stage's parameters.

    Raises:
        ConfigError: If the stage has nothing to train.
    """

    def __init__(
        self,
        stage: Stage,
        student_features: FeatureExtractor,
        teacher_features: FeatureExtractor,
        optimizer: Callable[..., torch.optim.Optimizer],
    ) -> None:
        super().__init__()
        self.stage = stage
        # registered so that Lightning moves them to the device; only `trained` is optimized
        self.student = student_features.model
        self.teacher = teacher_features.model
        self.parts = nn.ModuleList(stage.modules)
        self.student_features = student_features
        self.teacher_features = teacher_features
        self.optimizer_factory = optimizer
        self.epoch_losses: list[float] = []
        self._sum, self._count = 0.0, 0
        if not list(self.trained()):
            raise ConfigError("distill", f"stage {stage.name} has no parameters to train")

    def trained(self) -> Iterator[nn.Parameter]:
        """The parameters this stage updates."""
        modules = [*self.parts, *([self.student] if self.stage.train_student else [])]
        seen: set[int] = set()
        for module in modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def train(self, mode: bool = True) -> StageModule:
        """Train mode for what the stage trains; the teacher (and an untrained student) stay in eval."""
        super().train(mode)
        self.teacher.eval()
        if not self.stage.train_student:
            self.student.eval()
        return self

    def on_train_start(self) -> None:
        # Lightning keeps each module's mode as it finds it: set the stage's modes explicitly.
        self.train()
        self.student_features.sync()  # submodules Lightning replaced (sync_batchnorm)
        self.teacher_features.sync()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x = batch["input"]
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            teacher = self.teacher_features(x)
        student = self.student_features(x) if self.stage.train_student else None
        terms = self.stage.loss(student, teacher, batch)
        loss = torch.stack(list(terms.values())).sum()
        n = len(x)
        for name, value in terms.items():
            self.log(f"stage_{self.stage.name}/loss_{name}", value, on_epoch=True, on_step=False, batch_size=n)
        self._sum += float(loss.detach()) * n
        self._count += n
        return loss

    def on_train_epoch_end(self) -> None:
        mean = self._sum / max(self._count, 1)
        self.epoch_losses.append(mean)
        self._sum, self._count = 0.0, 0
        if not math.isfinite(mean):
            raise FloatingPointError(f"stage {self.stage.name}: loss is {mean} at epoch {self.current_epoch}")

    def configure_optimizers(self) -> Any:
        return self.optimizer_factory(list(self.trained()))


def run_stages(
    stages: list[Stage],
    *,
    student_features: FeatureExtractor,
    teacher_features: FeatureExtractor | None,
    datamodule: L.LightningDataModule,
    optimizer: Callable[..., torch.optim.Optimizer],
    make_trainer: Callable[[int], L.Trainer],
) -> list[dict[str, Any]]:
    """Runs each stage in order and reports what it did.

    Args:
        stages: The method's stages.
        student_features: The student's feature extractor.
        teacher_features: The teacher's feature extractor.
        datamodule: The data (its training split).
        optimizer: ``partial`` of the run's optimizer.
        make_trainer: Builds a Trainer for a number of epochs (the run's device settings, no
            validation, checkpoints or loggers; under DDP one that allows unused parameters, as
            a stage trains part of the model).

    Returns:
        One entry per stage for ``results.json``: name, epochs, mean loss of the first and
        last epoch.

    Raises:
        ConfigError: If a stage is malformed or there is no teacher.
    """
    report = []
    for stage in stages:
        check_int(f"stage {stage.name} epochs", stage.epochs, 1, valid=">= 1")
        if teacher_features is None:
            raise ConfigError("distill", f"stage {stage.name} needs a teacher")
        module = StageModule(stage, student_features, teacher_features, optimizer)
        log.info("stage %s: %d epochs before distillation", stage.name, stage.epochs)
        modes = {m: m.training for m in student_features.model.modules()}
        # a stage that does not train the student leaves it out of autograd (and of DDP's
        # bookkeeping, which would wait for its gradients)
        grads = {p: p.requires_grad for p in student_features.model.parameters()}
        if not stage.train_student:
            student_features.model.requires_grad_(False)
        try:
            make_trainer(stage.epochs).fit(module, datamodule=datamodule)
        finally:  # the main training finds the student as it was, without the stage's gradients
            for m, training in modes.items():
                m.training = training
            for p in module.trained():
                p.grad = None
            for p, required in grads.items():
                p.requires_grad_(required)
        if stage.freeze_after:
            for part in stage.modules:
                part.requires_grad_(False)
        losses = module.epoch_losses
        log.info("stage %s done: loss %.4g -> %.4g", stage.name, losses[0], losses[-1])
        report.append({"name": stage.name, "epochs": len(losses), "loss_first": losses[0], "loss_last": losses[-1]})
    return report
