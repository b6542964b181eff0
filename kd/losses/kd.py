"""Knowledge distillation with softened targets.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep
Learning Workshop, arXiv:1503.02531. The student matches the teacher's class distribution at a
raised temperature T; section 2 of the paper scales the soft term by T^2 so that its gradient,
which shrinks as 1/T^2, keeps its magnitude relative to the hard-label term as T changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.base import DistillationLoss, check_positive
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged over the batch.

    Its gradient with respect to the student logits is ``(softmax(s/T) - softmax(t/T)) * T / B``.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.
        temperature: T > 0 (a number, or a 0-d tensor that may carry a gradient, as CTKD's).

    Returns:
        A scalar tensor.
    """
    # In fp32 even under bf16/fp16 autocast: softmax(z / T) of low-precision logits loses the
    # small differences between non-target classes that carry the "dark knowledge".
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (B, C)
    log_p_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # (B, C)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KDLoss(DistillationLoss):
    """Hinton KD: ``ce_weight * CE(student, y) + weight * T^2 * KL(teacher_T || student_T)``.

    Hinton's weighted average ``alpha * KD + (1 - alpha) * CE`` is ``weight=alpha,
    ce_weight=1-alpha``; the CRD/DKD CIFAR-100 recipe uses 0.9 and 0.1, CRD+KD uses 1 and 1.

    Args:
        temperature: Softening temperature T > 0 (the CIFAR recipes use 4; Hinton's MNIST
            experiment used 20).
        weight: Weight of the distillation term (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: If ``temperature`` is not > 0 or a weight is negative.
    """

    def __init__(self, temperature: float = 4.0, weight: float | Schedule = 0.9, ce_weight: float = 0.1) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperature = check_positive("temperature", temperature)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "KDLoss needs the teacher's output"
        return {"kd": kd_loss(student.logits, teacher.logits, self.temperature)}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, {super().extra_repr()}"
