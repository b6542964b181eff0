"""Knowledge distillation on standardised (Z-score) logits.

Sun, Ren, Li, Wang and Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
arXiv:2403.01427. Sharing one temperature forces the student to match the range and variance
of the teacher's logits, not just their relations. The paper instead gives each sample a
temperature proportional to the standard deviation of its logits, which amounts to Z-scoring
every logit vector before a KD at a base temperature (Algorithm 1):

    Z(z) = (z - mean(z)) / (std(z) + 1e-7),   loss = T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T)).

The loss is invariant to shifting and to positively scaling either model's logits, sample by
sample. ``standardize`` follows the authors' ``normalize`` (sunshangquan/logit-standardization-KD,
``mdistiller/distillers/KD.py``): mean and torch's default unbiased std over the classes, and
1e-7 added to the std. The KD term is ``kd.losses.kd.kd_loss`` (batch mean of the KL, ``* T^2``
with the base temperature, as in the authors' ``kd_loss``). Deviation: the standardisation runs
in fp32 under bf16/fp16 autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_positive
from kd.losses.kd import kd_loss
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-scores each row: ``(z - mean) / (eps + std)`` with the unbiased std over the classes.

    Args:
        logits: ``(B, C)`` with C >= 2.
        eps: Added to the std, 1e-7 as in the authors' code.

    Returns:
        ``(B, C)`` in fp32 (or wider).
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (B, C)
    mean = z.mean(dim=-1, keepdim=True)  # (B, 1)
    std = z.std(dim=-1, keepdim=True)  # (B, 1)
    return (z - mean) / (eps + std)


def logit_standard_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(Z(t) / T) || softmax(Z(s) / T))`` averaged over the batch.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.
        temperature: Base temperature T > 0.

    Returns:
        A scalar tensor.
    """
    return kd_loss(standardize(student_logits), standardize(teacher_logits), temperature)


class LogitStandardKD(DistillationLoss):
    """KD on Z-scored logits: ``ce_weight * CE + weight * T^2 * KL(Z(t)/T || Z(s)/T)``.

    The authors' CIFAR-100 KD+LS command (``--logit-stand --base-temp 2 --kd-weight 9``) runs
    base temperature 2, KD weight 9 and mdistiller's KD CE weight 0.1 (kept at 0.1 on purpose,
    their issue #8); some of their pairs use base temperature 3.

    Args:
        temperature: Base temperature T > 0.
        weight: Weight of the KD term (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: If ``temperature`` is not > 0 or a weight is negative.
    """

    def __init__(self, temperature: float = 2.0, weight: float | Schedule = 9.0, ce_weight: float = 0.1) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperature = check_positive("temperature", temperature)

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Checks student and teacher score the same classes, at least two.

        Raises:
            ConfigError: When their logits differ in width or have a single class (no std).
        """
        classes = student.logits.shape[-1]
        if teacher is None or teacher.logits.shape[-1] != classes or classes < 2:
            got = "no teacher" if teacher is None else f"{teacher.logits.shape[-1]} teacher classes"
            raise ConfigError(
                "model.teacher", f"logit standardisation needs student and teacher logits over the same "
                f">= 2 classes: the student has {classes}, got {got}"
            )

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "LogitStandardKD needs the teacher's output"
        return {"kd": logit_standard_kd_loss(student.logits, teacher.logits.detach(), self.temperature)}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, {super().extra_repr()}"
