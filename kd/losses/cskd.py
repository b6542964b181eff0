"""Class-wise self-knowledge distillation (CS-KD).

Yun, Park, Lee and Shin, "Regularizing Class-wise Predictions via Self-knowledge Distillation",
CVPR 2020, arXiv:2003.13964. No teacher: the student's prediction on a sample ``x`` is pulled towards
its own prediction, without gradient, on another sample ``x'`` of the same class, at temperature T:
``CE(s(x), y) + lambda * T^2 * KL(softmax(s(x') / T) || softmax(s(x) / T))``. The batches pair
each sample with such a partner (``kd.data.pairs``); the training module adds the student's
detached logits on the partners as ``batch["pair_logits"]``.

As the authors' ``train.py`` (github.com/alinlab/cs-kd): the partner is drawn uniformly among the
training samples of the class (it may be the sample itself), its forward runs in train mode under
``no_grad`` after the sample's, the KL is summed over classes and averaged over the batch
(``KLDivLoss(reduction="sum") * T^2 / B``), and CE and accuracy are of the samples, not the partners.
"""

from __future__ import annotations

from torch import Tensor

from kd.losses.base import DistillationLoss, check_positive
from kd.losses.kd import kd_loss
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


class CSKDLoss(DistillationLoss):
    """CS-KD: ``ce_weight * CE(s(x), y) + weight * T^2 * KL(softmax(s(x') / T) || softmax(s(x) / T))``.

    Args:
        temperature: T > 0 (the authors' 4).
        weight: lambda, the weight of the class-wise term (the authors' CIFAR-100 command: 1; 3 on
            the fine-grained datasets).
        ce_weight: Weight of the hard-label cross-entropy (1).

    Raises:
        ConfigError: If ``temperature`` is not > 0 or a weight is negative.
    """

    requires_teacher = False
    requires_pairs = True

    def __init__(self, temperature: float = 4.0, weight: float | Schedule = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperature = check_positive("temperature", temperature)

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        if "pair_logits" not in batch:
            raise ValueError("CSKDLoss needs batch['pair_logits'], the student's logits on same-class partners "
                             "(kd.data.pairs; the training module adds them when the batch has pair_input)")
        return {"cls": kd_loss(student.logits, batch["pair_logits"].detach(), self.temperature)}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, {super().extra_repr()}"
