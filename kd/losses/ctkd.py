"""CTKD: KD at a temperature the student learns adversarially, along a curriculum.

Li, Li, Yang, Yang, Cheng, Zhang, Lin and Wang, "Curriculum Temperature for Knowledge
Distillation", AAAI 2023, arXiv:2211.16231. The temperature is a learned parameter
``tau = t_start + t_range * sigmoid(theta)``; the student minimises the KD loss while the
temperature maximises it: its gradient passes through a gradient-reversal layer that multiplies it
by ``lambda``, which a cosine curriculum takes from 0 to -1 (an easy task first, then harder):

    lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 + cos(pi * min(e, E) / E)) / 2,

e the 1-based epoch, E = ``lambda_epochs``, set once per epoch. loss = ce_weight * CE +
weight * tau^2 * KL(softmax(t / tau) || softmax(s / tau)), tau's gradient coming through both
softmaxes and the tau^2 factor.

As the authors' code (zhengli97/CTKD: ``models/temp_global.py``, ``train_student.py``,
``scripts/run_cifar_distill.sh``): the global temperature, theta initialised to 1 (tau 15.62 at
the start), t_start 1 and t_range 20 (tau in (1, 21)), lambda from 0 to -1 over 10 epochs, KD
weights 0.9 / CE 0.1 on CIFAR-100; theta is a parameter of the method, trained by the run's
optimizer with the student (same lr, momentum and weight decay, as there). The instance-wise
temperature (a small MLP per sample) is not in the authors' released code and not here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import DistillationLoss, check_positive
from kd.losses.kd import kd_loss
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``lam`` backward (reversed when ``lam < 0``)."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:  # noqa: ANN001 - autograd's ctx
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return ctx.lam * grad, None


def curriculum(epoch: int, epochs: int, lam_max: float, lam_min: float) -> float:
    """The gradient-reversal factor at 1-based ``epoch``: cosine from ``lam_max`` to ``lam_min``
    over ``epochs`` epochs, then ``lam_min`` (the authors' ``CosineDecay``)."""
    e = min(max(epoch, 0), epochs)
    return lam_min + (lam_max - lam_min) * (math.cos(e * math.pi / epochs) + 1.0) / 2


class CTKDLoss(DistillationLoss):
    """KD at a learned, adversarial temperature on a curriculum.

    Args:
        t_start: Lower bound of the temperature.
        t_range: Its range: ``tau = t_start + t_range * sigmoid(theta)``.
        init: Initial ``theta`` (1: tau = 1 + 20 sigmoid(1) = 15.62).
        lambda_max: The reversal factor at the start of the curriculum (0).
        lambda_min: Its value from ``lambda_epochs`` on (-1: the full reversal).
        lambda_epochs: Epochs of the cosine curriculum (10 on CIFAR-100, 5 on ImageNet).
        weight: Weight of the KD term (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On a non-positive ``t_start`` or ``t_range``, ``lambda_epochs < 1``, or
            a ``lambda_max`` below ``lambda_min``.
    """

    def __init__(
        self,
        t_start: float = 1.0,
        t_range: float = 20.0,
        init: float = 1.0,
        lambda_max: float = 0.0,
        lambda_min: float = -1.0,
        lambda_epochs: int = 10,
        weight: float | Schedule = 0.9,
        ce_weight: float = 0.1,
    ) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.t_start = check_positive("t_start", t_start)
        self.t_range = check_positive("t_range", t_range)
        self.lambda_epochs = check_int("lambda_epochs", lambda_epochs, 1, valid=">= 1")
        if not lambda_max >= lambda_min:
            raise ConfigError("lambda_max", f"must be >= lambda_min ({lambda_min}), got {lambda_max}")
        self.lambda_max, self.lambda_min = float(lambda_max), float(lambda_min)
        self.theta = nn.Parameter(torch.tensor([float(init)]))
        self.lam = curriculum(1, self.lambda_epochs, self.lambda_max, self.lambda_min)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, epoch: int = 0) -> dict[str, Tensor]:
        self.lam = curriculum(epoch + 1, self.lambda_epochs, self.lambda_max, self.lambda_min)  # once per epoch
        return super().forward(student, teacher, batch, epoch)

    def temperature(self) -> Tensor:
        """``tau``, shape ``(1,)``, its gradient scaled by the current ``lambda``."""
        return self.t_start + self.t_range * torch.sigmoid(_ScaleGradient.apply(self.theta, self.lam))

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        assert teacher is not None, "CTKDLoss needs the teacher's output"
        # kd.losses.kd.kd_loss at a tensor temperature: tau's gradient flows through both softmaxes and tau^2
        return {"ctkd": kd_loss(student.logits, teacher.logits.detach(), self.temperature().squeeze())}

    def extra_repr(self) -> str:
        return (f"tau=[{self.t_start:g}, {self.t_start + self.t_range:g}], lambda {self.lambda_max:g} -> "
                f"{self.lambda_min:g} over {self.lambda_epochs} epochs, {super().extra_repr()}")
