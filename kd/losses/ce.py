"""Plain cross-entropy on the hard labels: training without a teacher (``distill=none``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd.losses.base import DistillationLoss, check_weight
from kd.outputs import Batch, ModelOutput


class CrossEntropy(DistillationLoss):
    """Hard-label cross-entropy, the baseline and the teacher's own training objective.

    Args:
        label_smoothing: Label smoothing in ``[0, 1)`` (Szegedy et al. 2016), 0 by default.

    Raises:
        ConfigError: If ``label_smoothing`` is outside ``[0, 1)``.
    """

    requires_teacher = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__(ce_weight=0.0, weight=1.0)
        self.label_smoothing = check_weight("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(student.logits, batch["target"], label_smoothing=self.label_smoothing)
        return {"ce": ce}
