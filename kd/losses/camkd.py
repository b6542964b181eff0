"""CA-MKD: each teacher of an ensemble weighted, sample by sample, by how well it predicts the label.

Zhang, Chen and Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022,
arXiv:2201.00007. With K teachers (``model.teachers``), teacher k's weight on sample x is

    w_k(x) = (1 - softmax_k(CE(z_k(x), y))) / (K - 1),

the softmax taken over the teachers of their cross-entropies against the label: the more
confident a teacher is of the right class, the larger its weight; the weights sum to 1. The
distillation term is ``sum_k sum_x w_k(x) * T^2 * KL(softmax(z_k(x)/T) || softmax(s(x)/T)) / (B * K)``,
as the authors' code computes it (github.com/Rorozhl/CA-MKD, helper/loops.py, branch
``CAMKD``, with ``DistillKL(is_ca=True)``: note the division by K as well as by the batch).

This is the paper's logit term; its intermediate-feature term (the student's last stage mapped to
each teacher's by a 1x1 conv, weighted by each teacher's classifier on the mapped feature;
``-b 50`` in the authors' scripts, 0 by default in their code) is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_positive
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def confidence_weights(teacher_logits: list[Tensor], target: Tensor) -> Tensor:
    """``(K, B)`` weights: ``(1 - softmax over teachers of CE(z_k, y)) / (K - 1)``, no gradient."""
    ce = torch.stack([F.cross_entropy(z.float(), target, reduction="none") for z in teacher_logits])  # (K, B)
    return ((1.0 - torch.softmax(ce, dim=0)) / (len(teacher_logits) - 1)).detach()


def camkd_loss(student_logits: Tensor, teacher_logits: list[Tensor], target: Tensor, temperature: float) -> Tensor:
    """CA-MKD's logit term: the confidence-weighted per-sample KDs, summed and divided by ``B * K``."""
    weights = confidence_weights(teacher_logits, target)  # (K, B)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    kl = torch.stack([
        F.kl_div(log_p_s, F.log_softmax(z.detach().float() / temperature, dim=-1), reduction="none", log_target=True).sum(-1)
        for z in teacher_logits
    ]) * temperature**2  # (K, B)
    return (weights * kl).sum() / kl.numel()


class CAMKDLoss(DistillationLoss):
    """CA-MKD's confidence-weighted distillation from a teacher ensemble (module docstring).

    Terms: ``ce`` (``ce_weight``, the code's gamma) and ``kd`` (``weight``, its alpha).

    Args:
        temperature: T > 0 (the authors' default: 4).
        weight: Weight of the distillation term (a number or a schedule); the authors': 1.
        ce_weight: Weight of the hard-label cross-entropy; the authors': 1.

    Raises:
        ConfigError: If ``temperature`` is not > 0, a weight is negative, or the run has one teacher.
    """

    requires_ensemble = True

    def __init__(self, temperature: float = 4.0, weight: float | Schedule = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperature = check_positive("temperature", temperature)

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        if teacher is None or len(teacher.members) < 2:
            raise ConfigError("_target_", "CA-MKD weighs the teachers of an ensemble: give two or more as "
                              "model.teachers (e.g. experiment=cifar100_camkd)")

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        assert teacher is not None
        logits = [m.logits for m in teacher.members.values()]
        return {"kd": camkd_loss(student.logits, logits, batch["target"], self.temperature)}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, {super().extra_repr()}"
