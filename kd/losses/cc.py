"""Correlation congruence: the student matches the teacher's sample-to-sample correlations.

Peng, Jin, Liu, Li, Wu, Liu, Zhou and Zhang, "Correlation Congruence for Knowledge
Distillation", ICCV 2019, arXiv:1904.01802. Each model's embeddings ``F`` of a batch give a
``B x B`` correlation matrix ``psi(F)_ij = k(F_i, F_j)``; the loss is
``L_CC = ||psi(F_t) - psi(F_s)||_2^2 / B^2``. The kernel is the Gaussian RBF
``k(x, y) = exp(-gamma ||x - y||^2)``, approximated by its P-order Taylor series: on L2-normalised
embeddings ``||x - y||^2 = 2 - 2 x.y``, so
``k(x, y) ~= sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! * (x.y)^p`` (the paper: gamma 0.4, P 2).
The paper's full objective adds this term to KD (CCKD); kd's method is the CC term alone, with
the hard-label cross-entropy.

kd follows the paper. RepDistiller's ``distiller_zoo/CC.py`` ("Correlation", the CRD benchmark)
is a different, simplified formula, ``mean_i sum_d |s_i - t_i|_d * |s_{i+1} - t_{i+1}|_d`` over
consecutive samples of its embeddings, and its weight 0.02 does not carry over. torchdistill's
``CCKDLoss`` applies the Taylor series to unnormalised embeddings and divides the *unsquared*
Frobenius norm by ``B^2``.

Embeddings: the pooled penultimate features. When the student's width differs from the
teacher's, kd maps the student's embedding to the teacher's width with a learned linear layer
(built in ``setup``) and uses the teacher's embedding as it is, so the teacher's correlations
stay a fixed target; equal widths need no layer. torchdistill (``Linear4CCKD``) instead gives
both models a learned 128-d linear layer and trains the teacher's too, and RepDistiller uses its
CRD ``Embed`` (linear + L2 norm, 128-d) on both; a trained teacher embedding can lower the loss
by flattening the teacher's correlations instead of moving the student's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import DistillationLoss, check_pairs, check_positive
from kd.losses.common import flat, full_precision
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def correlation_matrix(e: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """The P-order Taylor approximation of the Gaussian RBF kernel matrix of L2-normalised rows.

    Args:
        e: ``(B, ...)`` embeddings, flattened to ``(B, D)`` and L2-normalised per row.
        gamma: RBF kernel parameter, > 0.
        order: Order P of the Taylor series, >= 1.

    Returns:
        ``(B, B)`` in fp32 (or fp64 for fp64 input): ``sum_{p<=P} e^{-2g} (2g)^p / p! (x_i.x_j)^p``.
    """
    x = F.normalize(flat(e).to(torch.promote_types(e.dtype, torch.float32)), dim=1)  # (B, D)
    with full_precision(x):  # in fp32: autocast would round the product to bf16/fp16
        sim = x @ x.t()  # (B, B), cosine similarities
    psi = torch.zeros_like(sim)
    for p in range(order + 1):
        psi = psi + (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
    return math.exp(-2 * gamma) * psi  # (B, B)


def cc_loss(e_s: Tensor, e_t: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """``||psi(e_t) - psi(e_s)||_F^2 / B^2`` for one student/teacher pair.

    Args:
        e_s: ``(B, D)`` student embedding (after its linear embedding, if any).
        e_t: ``(B, D')`` teacher embedding; not differentiated.
        gamma: RBF kernel parameter.
        order: Order of the Taylor series.

    Returns:
        A scalar tensor.
    """
    b = e_s.shape[0]
    psi_t = correlation_matrix(e_t.detach(), gamma, order)  # (B, B)
    psi_s = correlation_matrix(e_s, gamma, order)  # (B, B)
    return (psi_t - psi_s).pow(2).sum() / b**2


class CCLoss(DistillationLoss):
    """Correlation congruence: ``ce_weight * CE + weight * sum_pairs ||psi_t - psi_s||^2 / B^2``.

    Args:
        student_nodes: Student embeddings (the paper: the penultimate features, kd's ``pooled``).
        teacher_nodes: Teacher embeddings, as many as ``student_nodes``.
        gamma: Gaussian RBF parameter, > 0 (0.4 in the paper and torchdistill).
        order: Order P of the Taylor series, >= 1 (2 in the paper and torchdistill).
        weight: Weight of the CC term (a number or a schedule); 0.003 in torchdistill's CCKD
            recipe (ImageNet, beside KD at T = 1 with weight 1).
        ce_weight: Weight of the hard-label cross-entropy.

    Attributes:
        embeds: After ``setup``, per pair the student's linear embedding to the teacher's width
            (``nn.Identity`` where the widths agree).

    Raises:
        ConfigError: On unequal or empty node lists, ``gamma <= 0``, ``order < 1`` or a negative
            weight.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        gamma: float = 0.4,
        order: int = 2,
        weight: float | Schedule = 0.003,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        self.gamma = check_positive("gamma", gamma)
        self.order = check_int("order", order, low=1, valid=">= 1")
        self.embeds: nn.ModuleList | None = None

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds the student's linear embedding of each pair whose widths differ.

        Raises:
            ConfigError: When the widths differ and the student's feature is not a ``(B, D)``
                embedding (a linear layer over a whole flattened map is not the paper's method).
        """
        assert teacher is not None, "CCLoss needs the teacher's output"
        embeds = []
        for s, t in zip(self.student_nodes, self.teacher_nodes):
            f_s, f_t = student.features[s], teacher.features[t]
            d_s, d_t = flat(f_s).shape[1], flat(f_t).shape[1]
            if d_s == d_t:
                embeds.append(nn.Identity())
                continue
            if f_s.dim() != 2:
                raise ConfigError(
                    "student_nodes", f"CC embeds the student's (B, D) embedding to the teacher's width, "
                    f"but {s!r} has shape {tuple(f_s.shape)}; use the pooled node"
                )
            embeds.append(nn.Linear(d_s, d_t).to(f_s.device))
        self.embeds = nn.ModuleList(embeds)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "CCLoss needs the teacher's output"
        if self.embeds is None:
            raise RuntimeError("CCLoss.setup must run before the loss (it builds the embeddings)")
        loss = sum(
            cc_loss(embed(flat(student.features[s])), teacher.features[t], self.gamma, self.order)
            for s, t, embed in zip(self.student_nodes, self.teacher_nodes, self.embeds)
        )
        return {"cc": loss}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, order={self.order}, {super().extra_repr()}"
