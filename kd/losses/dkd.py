"""Decoupled knowledge distillation (DKD).

Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
Section 3.1 splits the KD loss of each sample into a target-class part and a non-target part,

    KD = KL(b^T || b^S) + (1 - p_t^T) * KL(p_hat^T || p_hat^S) = TCKD + (1 - p_t^T) * NCKD,

where ``b = [p_t, 1 - p_t]`` is the binary target / non-target distribution and ``p_hat`` the
distribution over the non-target classes alone. DKD drops the ``(1 - p_t^T)`` factor, which
suppresses NCKD exactly for the samples the teacher is sure of, and weighs the two parts
freely: ``alpha * TCKD + beta * NCKD``, both at temperature T and scaled by T^2.

The math follows mdistiller's ``dkd_loss`` (megvii-research/mdistiller, ``distillers/DKD.py``):
TCKD is the KL of the two-bin distributions built by summing softmax(z / T) over the target and
the other classes; NCKD is the KL of softmax(z / T - 1000 * gt_mask), i.e. the target logit
pushed down by 1000 so that its probability underflows to 0 and the rest renormalise. Both KLs
are summed over classes and averaged over the batch. Unlike mdistiller, the math runs in fp32
under bf16/fp16 autocast, and the two terms are returned separately (``tckd``, ``nckd``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.base import DistillationLoss, check_positive, check_weight
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """``alpha * TCKD`` and ``beta * NCKD`` as in mdistiller's ``dkd_loss``, each ``* T^2``, batch-averaged.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``, no gradient needed.
        target: ``(B,)`` class indices.
        alpha: Weight of the target-class term.
        beta: Weight of the non-target-class term.
        temperature: T > 0.

    Returns:
        ``(alpha * TCKD, beta * NCKD)``, two scalar tensors (fp32 or wider).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    z_s = student_logits.to(dtype) / temperature  # (B, C)
    z_t = teacher_logits.to(dtype) / temperature  # (B, C)
    gt_mask = F.one_hot(target.reshape(-1), z_s.shape[1]).to(torch.bool)  # (B, C)
    batch_size = z_s.shape[0]

    # TCKD: the binary [target, non-target] distributions.
    p_s = F.softmax(z_s, dim=1)  # (B, C)
    p_t = F.softmax(z_t, dim=1)  # (B, C)
    b_s = torch.stack([(p_s * gt_mask).sum(1), (p_s * ~gt_mask).sum(1)], dim=1)  # (B, 2)
    b_t = torch.stack([(p_t * gt_mask).sum(1), (p_t * ~gt_mask).sum(1)], dim=1)  # (B, 2)
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * temperature**2 / batch_size

    # NCKD: distributions over the non-target classes, the target masked out by -1000.
    offset = 1000.0 * gt_mask.to(dtype)  # (B, C)
    log_q_s = F.log_softmax(z_s - offset, dim=1)  # (B, C)
    q_t = F.softmax(z_t - offset, dim=1)  # (B, C)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * temperature**2 / batch_size
    return alpha * tckd, beta * nckd


class DKDLoss(DistillationLoss):
    """DKD: ``ce_weight * CE + weight(epoch) * (alpha * TCKD + beta * NCKD)``.

    The CIFAR-100 recipe (paper appendix A.4, mdistiller's config) uses T 4, alpha 1, CE weight 1
    and a linear warm-up of the DKD terms over the first 20 epochs, given in the config as
    ``weight: {_target_: kd.losses.schedules.LinearWarmup, value: 1.0, epochs: 20}``. beta is 8
    for resnet32x4 pairs, 6 for wrn and vgg pairs, 2 for resnet56/110 pairs, and 0.5 on ImageNet
    (with T 1).

    Args:
        temperature: Softening temperature T > 0.
        alpha: Weight of TCKD, >= 0.
        beta: Weight of NCKD, >= 0.
        weight: Weight of both terms, a number or a schedule (the recipe's warm-up).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: If ``temperature`` is not > 0 or a weight is negative.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        weight: float | Schedule = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperature = check_positive("temperature", temperature)
        self.alpha = check_weight("alpha", alpha)
        self.beta = check_weight("beta", beta)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "DKDLoss needs the teacher's output"
        tckd, nckd = dkd_loss(
            student.logits, teacher.logits.detach(), batch["target"], self.alpha, self.beta, self.temperature
        )
        return {"tckd": tckd, "nckd": nckd}

    def extra_repr(self) -> str:
        hyper = f"temperature={self.temperature:g}, alpha={self.alpha:g}, beta={self.beta:g}"
        return f"{hyper}, {super().extra_repr()}"
