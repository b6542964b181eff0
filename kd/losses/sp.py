"""Similarity-preserving distillation: the student matches the teacher's batch similarities.

Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019, arXiv:1907.09682. For
a batch of B samples and a feature flattened to ``Q`` of shape ``(B, D)``, the similarity matrix
is ``G = normalize_rows(Q Q^T)`` (each row divided by its L2 norm) and the loss is
``||G_t - G_s||_F^2 / B^2``, summed over the chosen layer pairs. It compares B x B matrices, so
the student's and the teacher's channel counts and sizes never need to agree.

The paper's CIFAR-10 experiments (the output of the last residual group) and RepDistiller
(``distiller_zoo/SP.py`` applied to ``feat[-2]``, the last stage's map; the CRD benchmark) use
the last stage only: kd's config passes every stage and ``last_only: true`` keeps the last of
each list, so one config fits models with any number of stages. Otherwise the same as
RepDistiller, with the Gram matrices computed in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_pairs
from kd.losses.common import flat, full_precision
from kd.losses.schedules import Schedule
from kd.outputs import Batch, ModelOutput


def similarity_matrix(f: Tensor) -> Tensor:
    """The row-normalised batch similarity ``normalize_rows(Q Q^T)`` of a feature.

    Args:
        f: ``(B, ...)`` feature (a map or an embedding), flattened to ``Q`` of shape ``(B, D)``.

    Returns:
        ``(B, B)`` in fp32 (or fp64 for fp64 input), each row of unit L2 norm.
    """
    q = flat(f.to(torch.promote_types(f.dtype, torch.float32)))  # (B, D)
    # Autocast would run the product in bf16/fp16, whose rounding is of the order of the
    # student-teacher differences the loss measures.
    with full_precision(q):
        return F.normalize(q @ q.t(), dim=1)  # (B, B)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``||G_t - G_s||_F^2 / B^2`` for one student/teacher pair.

    Args:
        f_s: ``(B, ...)`` student feature.
        f_t: ``(B, ...)`` teacher feature, any size (detached here).

    Returns:
        A scalar tensor.
    """
    b = f_s.shape[0]
    return (similarity_matrix(f_t.detach()) - similarity_matrix(f_s)).pow(2).sum() / b**2


class SPLoss(DistillationLoss):
    """Similarity preserving: ``ce_weight * CE + weight * sum_pairs ||G_t - G_s||_F^2 / B^2``.

    Args:
        student_nodes: Student features (maps or embeddings).
        teacher_nodes: Teacher features.
        last_only: Use only the last node of each list, the paper's and the CRD benchmark's
            setting (given all stages, the last stage). When False, the lists pair up one to one.
        weight: Weight of the SP term (a number or a schedule); 3000 in the CRD recipe.
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On empty node lists, lists of unequal length when ``last_only`` is False,
            or a negative weight.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        last_only: bool = True,
        weight: float | Schedule = 3000.0,
        ce_weight: float = 1.0,
    ) -> None:
        if not isinstance(last_only, bool):
            raise ConfigError("last_only", f"must be true or false, got {last_only!r}")
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        if last_only and self.student_nodes and self.teacher_nodes:
            # Only the last ones are read, so only those need collecting.
            self.student_nodes, self.teacher_nodes = self.student_nodes[-1:], self.teacher_nodes[-1:]
        check_pairs(self.student_nodes, self.teacher_nodes)
        self.last_only = last_only

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "SPLoss needs the teacher's output"
        pairs = zip(self.student_nodes, self.teacher_nodes)
        return {"sp": sum(sp_loss(student.features[s], teacher.features[t]) for s, t in pairs)}

    def extra_repr(self) -> str:
        return f"last_only={self.last_only}, {super().extra_repr()}"
