"""Logit matching: the student regresses the teacher's logits with a squared error.

Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014, arXiv:1312.6184, section
2.2. The shallow "mimic" net is trained on the logits ``z`` of the deep net (the inputs of its
softmax), not on its probabilities, with ``L = 1/(2N) sum_n ||g(x_n) - z_n||^2``: in log space
the small differences between the non-target classes are not squashed towards zero. Hinton et
al. 2015 (section 2.1) show that KD at a high temperature tends to this loss for zero-mean logits.

The worked example of ``docs/writing-a-method.md``; ``tests/test_guides.py`` runs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd.losses.base import DistillationLoss
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def logit_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``1/2 * ||s - t||^2`` summed over the classes, averaged over the batch.

    Its gradient with respect to the student logits is ``(s - t) / B``.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.

    Returns:
        A scalar tensor.
    """
    # in fp32 under bf16/fp16 autocast: squares of low-precision differences lose the small ones
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    diff = student_logits.to(dtype) - teacher_logits.to(dtype)  # (B, C)
    return 0.5 * diff.pow(2).sum(dim=1).mean()


class LogitMSELoss(DistillationLoss):
    """Logit matching: ``ce_weight * CE(student, y) + weight * 1/2 ||s - t||^2``.

    The paper trains the mimic net on the teacher's logits alone (``ce_weight=0``); a
    hard-label term is one override away (``distill.ce_weight=0.1``).

    Args:
        weight: Weight of the logit regression term (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: If a weight is negative (checked by ``DistillationLoss``).
    """

    def __init__(self, weight: float | Schedule = 1.0, ce_weight: float = 0.0) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "LogitMSELoss needs the teacher's output"
        return {"logit_mse": logit_mse_loss(student.logits, teacher.logits)}
