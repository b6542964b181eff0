"""DIST: distillation by correlation of class probabilities, within and across samples.

Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
arXiv:2205.10536. Exact matching of probabilities (KL) is hard for a student when the teacher is
much stronger, so DIST only asks for the same *relations*, measured by the Pearson correlation
``rho``: the inter-class relation compares each sample's distribution over classes
(``1 - mean_i rho(Y_s[i, :], Y_t[i, :])``), the intra-class relation each class's probabilities
across the batch (``1 - mean_j rho(Y_s[:, j], Y_t[:, j])``), with ``Y = softmax(Z / tau)``
and both terms scaled by ``tau^2``. The loss is ``beta * inter + gamma * intra``.

The formula follows the authors' ``DIST`` (hunto/image_classification_sota,
``lib/models/losses/dist_kd.py``): ``rho`` is the cosine similarity of the centred vectors with
``1e-8`` added to the product of their norms. Deviations: the math runs in fp32 under bf16/fp16
autocast, and the two relations are returned as separate terms (``dist_inter``, ``dist_intra``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.base import DistillationLoss, check_positive, check_weight
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``.

    Args:
        a: ``(N, D)``.
        b: ``(N, D)``.
        eps: Added to the product of the centred rows' norms, as in the authors' code.

    Returns:
        ``(N,)``.
    """
    a = a - a.mean(dim=1, keepdim=True)  # (N, D)
    b = b - b.mean(dim=1, keepdim=True)  # (N, D)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """DIST's inter-class and intra-class relation losses, each ``* tau^2``.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.
        tau: Softmax temperature > 0.

    Returns:
        ``(inter, intra)``: ``tau^2 * (1 - mean over samples of rho over classes)`` and
        ``tau^2 * (1 - mean over classes of rho over the batch)``, scalar tensors.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    y_s = F.softmax(student_logits.to(dtype) / tau, dim=1)  # (B, C)
    y_t = F.softmax(teacher_logits.to(dtype) / tau, dim=1)  # (B, C)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return tau**2 * inter, tau**2 * intra


class DISTLoss(DistillationLoss):
    """DIST: ``ce_weight * CE + weight * (beta * inter + gamma * intra)``.

    The authors' CIFAR-100 recipe uses tau 4, beta = gamma = 2 and CE weight 1; on ImageNet
    tau 1 and beta = gamma = 1.

    Args:
        tau: Softmax temperature > 0.
        beta: Weight of the inter-class relation, >= 0.
        gamma: Weight of the intra-class relation, >= 0.
        weight: Weight of both terms (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: If ``tau`` is not > 0 or a weight is negative.
    """

    def __init__(
        self,
        tau: float = 4.0,
        beta: float = 2.0,
        gamma: float = 2.0,
        weight: float | Schedule = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.tau = check_positive("tau", tau)
        self.beta = check_weight("beta", beta)
        self.gamma = check_weight("gamma", gamma)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "DISTLoss needs the teacher's output"
        inter, intra = dist_loss(student.logits, teacher.logits.detach(), self.tau)
        return {"dist_inter": self.beta * inter, "dist_intra": self.gamma * intra}

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, beta={self.beta:g}, gamma={self.gamma:g}, {super().extra_repr()}"
