"""Teacher-free KD with a manually designed ("virtual") teacher: Tf-KD_reg.

Yuan, Tay, Li, Wang and Feng, "Revisiting Knowledge Distillation via Label Smoothing
Regularization", CVPR 2020 (arXiv:1909.11723), section 5. KD is read as a learned label smoothing,
and a teacher that is never trained takes the teacher's place: for a sample of class ``c`` among
``K`` classes it puts probability ``a`` (0.99) on ``c`` and ``(1 - a) / (K - 1)`` on every other
class. The student matches that distribution softened at temperature ``T``.

The loss here is the authors' released code (``my_loss_function.py::loss_kd_regularization`` of
github.com/yuanli2333/Teacher-free-Knowledge-Distillation), which made the published numbers, not
a re-derivation from the paper's equation: the softening is ``softmax(u / T)`` of the virtual
teacher's *probabilities* ``u`` (not of logits), and the student's distribution is taken at
temperature 1. With the code's ``nn.KLDivLoss()`` (mean over all ``B x K`` entries) times its
``multiplier`` and ``reg_alpha``, the term is ``reg_alpha * multiplier / K`` times the
batch-mean KL computed here: that product is ``weight`` (the experiment configs convert).

The self-teacher variant (Tf-KD_self: the student's own architecture, trained first, as teacher)
is plain KD (``kd.losses.kd.KDLoss``) with the recipe's weights: see
``conf/experiment/cifar100_tfkd_resnet18.yaml``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_positive, check_weight
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def virtual_teacher(target: Tensor, num_classes: int, correct_prob: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """The virtual teacher's distribution ``u``: ``correct_prob`` on the label, the rest spread evenly.

    Args:
        target: ``(B,)`` class indices.
        num_classes: ``K`` >= 2.
        correct_prob: ``a`` in ``(0, 1]``.
        dtype: Of the result.

    Returns:
        ``(B, K)`` rows that sum to 1.
    """
    u = torch.full((target.shape[0], num_classes), (1.0 - correct_prob) / (num_classes - 1), dtype=dtype,
                   device=target.device)
    return u.scatter_(1, target[:, None], correct_prob)


def tfkd_reg_loss(student_logits: Tensor, target: Tensor, temperature: float, correct_prob: float) -> Tensor:
    """``KL(softmax(u / T) || softmax(s))`` averaged over the batch, ``u = virtual_teacher(target)``.

    Args:
        student_logits: ``(B, K)``.
        target: ``(B,)`` class indices.
        temperature: ``T`` > 0, applied to the virtual teacher's probabilities (as the released code does).
        correct_prob: The virtual teacher's probability of the true class.

    Returns:
        A scalar tensor.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 under autocast, as kd_loss
    u = virtual_teacher(target, student_logits.shape[-1], correct_prob, dtype)  # (B, K)
    log_q = F.log_softmax(u / temperature, dim=-1)  # (B, K), the softened virtual teacher
    log_p = F.log_softmax(student_logits.to(dtype), dim=-1)  # (B, K)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


class TfKDRegLoss(DistillationLoss):
    """Tf-KD_reg: ``ce_weight * CE(s, y) + weight * KL(softmax(u / T) || softmax(s))``, no teacher.

    Args:
        temperature: ``T`` > 0 (the authors' CIFAR-100 settings: 20 for ResNet18, 40 for
            MobileNetV2 and GoogLeNet, 10 for ShuffleNetV2).
        correct_prob: The virtual teacher's probability of the true class, in ``(0, 1)`` (0.99 in
            the released code).
        weight: Weight of the KL term: the code's ``reg_alpha * multiplier / K`` (ResNet18 on
            CIFAR-100: 0.1 * 100 / 100 = 0.1).
        ce_weight: Weight of the hard-label cross-entropy: the code's ``1 - reg_alpha``.

    Raises:
        ConfigError: For a temperature that is not > 0, ``correct_prob`` outside ``(0, 1)`` or a
            negative weight.
    """

    requires_teacher = False

    def __init__(self, temperature: float = 20.0, correct_prob: float = 0.99, weight: float | Schedule = 0.1,
                 ce_weight: float = 0.9) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperature = check_positive("temperature", temperature)
        self.correct_prob = check_weight("correct_prob", correct_prob, 0.0, 1.0, high_open=True)
        if self.correct_prob == 0.0:
            raise ConfigError("correct_prob", "must be in (0, 1), got 0")

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        return {"tfkd": tfkd_reg_loss(student.logits, batch["target"], self.temperature, self.correct_prob)}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, correct_prob={self.correct_prob:g}, {super().extra_repr()}"
