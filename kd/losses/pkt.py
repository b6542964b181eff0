"""Probabilistic knowledge transfer: the student matches the teacher's neighbour distributions.

Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV
2018, arXiv:1803.10837. Each model's embeddings of a batch define conditional probabilities of
picking sample j as the neighbour of sample i, from the cosine-similarity kernel
``K(a, b) = (cos(a, b) + 1) / 2`` normalised over j; the student minimises the KL divergence
``KL(P_teacher || P_student)``. Only B x B matrices are compared, so the widths of the two
embeddings may differ.

As the authors' code (passalis/probabilistic_kt, ``nn/pkt.py``), RepDistiller
(``distiller_zoo/PKT.py``, the CRD benchmark, whose weight 30000 kd uses) and torchdistill: each
vector is divided by ``norm + eps`` (eps 1e-7), the rows are normalised *including* the sample
itself (the paper's conditional probabilities leave ``j = i`` out), the divergence is
``mean_ij p_ij * log((p_ij + eps) / (q_ij + eps))``, i.e. the paper's sum divided by ``B^2``, and
features are flattened to one vector per sample. kd computes it in fp32 (the product out of
autocast, which would run it in bf16/fp16) and does not zero NaNs in the normalised features as
the reference does (a NaN feature should surface, not be hidden).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kd.losses.base import DistillationLoss, check_pairs, check_positive
from kd.losses.common import flat, full_precision
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def pkt_probabilities(f: Tensor, eps: float = 1e-7) -> Tensor:
    """Row-stochastic neighbour probabilities from the cosine kernel ``(cos + 1) / 2``.

    Args:
        f: ``(B, ...)`` feature, flattened to ``(B, D)``.
        eps: Added to each vector's norm before dividing by it.

    Returns:
        ``(B, B)`` in fp32 (or fp64 for fp64 input); each row sums to 1.
    """
    x = flat(f).to(torch.promote_types(f.dtype, torch.float32))  # (B, D)
    x = x / (x.norm(dim=1, keepdim=True) + eps)  # (B, D)
    with full_precision(x):  # in fp32: autocast would round the product to bf16/fp16
        k = (x @ x.t() + 1.0) / 2.0  # (B, B), in [0, 1]
    return k / k.sum(dim=1, keepdim=True)  # (B, B)


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = 1e-7) -> Tensor:
    """``mean_ij p_ij log((p_ij + eps) / (q_ij + eps))``: KL(teacher || student) over ``B^2``.

    Args:
        f_s: ``(B, ...)`` student feature (its probabilities are ``q``).
        f_t: ``(B, ...)`` teacher feature (``p``), any width; not differentiated.
        eps: Stabiliser of the normalisation and the logarithm (1e-7 in the reference code).

    Returns:
        A scalar tensor, 0 when both give the same probabilities.
    """
    p = pkt_probabilities(f_t.detach(), eps)  # (B, B)
    q = pkt_probabilities(f_s, eps)  # (B, B)
    return (p * torch.log((p + eps) / (q + eps))).mean()


class PKTLoss(DistillationLoss):
    """PKT: ``ce_weight * CE + weight * sum_pairs KL(P_t || P_s) / B^2``.

    Args:
        student_nodes: Student embeddings (the paper and the CRD benchmark: the penultimate
            layer, kd's ``pooled`` node); feature maps are flattened.
        teacher_nodes: Teacher embeddings, as many as ``student_nodes``; widths may differ.
        eps: Stabiliser, > 0 (1e-7 in the authors' code).
        weight: Weight of the PKT term (a number or a schedule); 30000 in the CRD recipe.
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On unequal or empty node lists, ``eps <= 0`` or a negative weight.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        eps: float = 1e-7,
        weight: float | Schedule = 30000.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        self.eps = check_positive("eps", eps)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "PKTLoss needs the teacher's output"
        pairs = zip(self.student_nodes, self.teacher_nodes)
        return {"pkt": sum(pkt_loss(student.features[s], teacher.features[t], self.eps) for s, t in pairs)}

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}, {super().extra_repr()}"
