"""Relational knowledge distillation: the student matches the teacher's distances and angles.

Park, Kim, Lu and Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. Instead
of matching embeddings one sample at a time, RKD transfers the structure of the batch:

- distance-wise (section 3.2.1): the pairwise Euclidean distances ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu``,
  each divided by its mean ``mu`` over the pairs of the batch, compared with the Huber (smooth L1)
  loss;
- angle-wise (section 3.2.2): for every triplet the cosine of the angle at ``t_j`` between ``t_i`` and
  ``t_k``, ``<(t_i - t_j) / ||t_i - t_j||, (t_k - t_j) / ||t_k - t_j||>``, also with smooth L1.

Both relations are free of the embedding's width, so the student's and the teacher's widths may
differ, and invariant to rotating and uniformly scaling an embedding.

As the authors' code (lenscloth/RKD, ``metric/loss.py``) and RepDistiller
(``distiller_zoo/RKD.py``, the CRD benchmark, whose weights 25 and 50 kd uses): ``mu`` is the
mean of the positive entries of the ``B x B`` distance matrix, the smooth L1 losses average over
all ``B x B`` (distance) and ``B x B x B`` (angle) entries, degenerate ones included (they are
equal for both models: 0 on the diagonal, 1 where ``i = k``), and features are flattened to one
vector per sample. kd computes both in fp32 (the products out of autocast, which would run them
in bf16/fp16) and guards the batch of one (or of identical samples), whose mean distance is zero,
instead of returning NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_pairs, check_weight
from kd.losses.common import flat, full_precision
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def _fp32(f: Tensor) -> Tensor:
    return flat(f).to(torch.promote_types(f.dtype, torch.float32))  # (B, D)


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of ``e``, zero on the diagonal.

    Squared distances are clamped to ``eps`` before the square root (as in the reference code),
    which keeps the gradient finite for coinciding samples.

    Args:
        e: ``(B, D)`` embeddings.
        eps: Floor of the squared distances.

    Returns:
        ``(B, B)`` distances.
    """
    sq = e.pow(2).sum(dim=1)  # (B,)
    with full_precision(e):  # in e's dtype: autocast would round the product to bf16/fp16
        d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)  # (B, B)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)  # (B, B)


def normalized_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise distances divided by their mean over the positive entries (the paper's ``mu``).

    Args:
        e: ``(B, D)`` embeddings.
        eps: Floor of the squared distances and of ``mu``.

    Returns:
        ``(B, B)``; all zeros when no two samples differ.
    """
    d = pairwise_distances(e, eps)  # (B, B)
    mu = d.sum() / (d > 0).sum().clamp(min=1)  # d >= 0: the mean of its positive entries
    return d / mu.clamp(min=eps)


def triplet_angles(e: Tensor) -> Tensor:
    """Cosines of the angles of all triplets: ``[j, i, k] = cos angle(e_i, e_j, e_k)`` at ``e_j``.

    Args:
        e: ``(B, D)`` embeddings.

    Returns:
        ``(B, B, B)``; entries with ``i = j`` or ``k = j`` are 0.
    """
    unit = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (B, B, D): [j, i] ~ e_i - e_j
    with full_precision(unit):  # in e's dtype, not autocast's
        return unit @ unit.transpose(1, 2)  # (B, B, B)


def rkd_distance_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """RKD-D: smooth L1 between the normalised distance matrices, averaged over ``B x B``.

    Args:
        e_s: ``(B, ...)`` student embedding (flattened to ``(B, D_s)``).
        e_t: ``(B, ...)`` teacher embedding (flattened to ``(B, D_t)``); not differentiated.

    Returns:
        A scalar tensor.
    """
    with torch.no_grad():
        t = normalized_distances(_fp32(e_t.detach()))  # (B, B)
    return F.smooth_l1_loss(normalized_distances(_fp32(e_s)), t)


def rkd_angle_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """RKD-A: smooth L1 between the triplet-angle cosines, averaged over ``B x B x B``.

    Args:
        e_s: ``(B, ...)`` student embedding (flattened to ``(B, D_s)``).
        e_t: ``(B, ...)`` teacher embedding (flattened to ``(B, D_t)``); not differentiated.

    Returns:
        A scalar tensor.
    """
    with torch.no_grad():
        t = triplet_angles(_fp32(e_t.detach()))  # (B, B, B)
    return F.smooth_l1_loss(triplet_angles(_fp32(e_s)), t)


class RKDLoss(DistillationLoss):
    """RKD: ``ce_weight * CE + weight * (w_d * RKD-D + w_a * RKD-A)``, summed over node pairs.

    Terms: ``rkd_distance`` (``w_d * RKD-D``) and ``rkd_angle`` (``w_a * RKD-A``); a term whose
    coefficient is 0 is left out.

    Args:
        student_nodes: Student embeddings (the paper: the final embedding, kd's ``pooled`` node);
            feature maps are flattened.
        teacher_nodes: Teacher embeddings, as many as ``student_nodes``; widths may differ.
        w_d: Coefficient of the distance term, >= 0 (25 in the CRD recipe).
        w_a: Coefficient of the angle term, >= 0 (50 in the CRD recipe).
        weight: Weight of both terms (a number or a schedule); 1 in the CRD recipe.
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On unequal or empty node lists, a negative coefficient or both 0.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        w_d: float = 25.0,
        w_a: float = 50.0,
        weight: float | Schedule = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        self.w_d = check_weight("w_d", w_d)
        self.w_a = check_weight("w_a", w_a)
        if self.w_d == 0 and self.w_a == 0:
            raise ConfigError("w_d", "w_d and w_a are both 0, so RKD has no term; set one > 0 (25 and 50)")

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "RKDLoss needs the teacher's output"
        nodes = zip(self.student_nodes, self.teacher_nodes)
        pairs = [(student.features[s], teacher.features[t]) for s, t in nodes]
        terms: dict[str, Tensor] = {}
        if self.w_d > 0:
            terms["rkd_distance"] = self.w_d * sum(rkd_distance_loss(s, t) for s, t in pairs)
        if self.w_a > 0:
            terms["rkd_angle"] = self.w_a * sum(rkd_angle_loss(s, t) for s, t in pairs)
        return terms

    def extra_repr(self) -> str:
        return f"w_d={self.w_d:g}, w_a={self.w_a:g}, {super().extra_repr()}"
