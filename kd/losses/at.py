"""Attention transfer: the student matches the teacher's spatial attention maps.

Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928. The
activation-based attention map of a ``(C, H, W)`` feature is ``Q = sum_c |A_c|^p`` (section 3.1,
p = 2), flattened over space and L2-normalised; the loss (eq. 2) penalises the distance between
the student's and the teacher's normalised maps at several layers. Channel counts may differ:
the map sums them away.

As in the authors' code (szagoruyko/attention-transfer, ``utils.at_loss``) and RepDistiller
(``distiller_zoo/AT.py``, the CRD benchmark): the map is the channel *mean* of ``|A|^p`` (the
same after normalisation), and the distance is the *mean* squared difference over the batch and
the spatial positions rather than eq. 2's unsquared L2 norm; weight 1000 on that mean is the
paper's setting of beta to 10^3 divided by the number of elements in the attention map and the
batch size, and the CRD CIFAR-100 recipe. A pair whose resolutions differ is matched by
average-pooling the larger map to the smaller (``kd.losses.common.match_spatial``, as
RepDistiller, which assumes square maps). RepDistiller raises ``f`` to ``p`` without ``abs``;
the two agree for p = 2 and for post-ReLU features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_pairs, check_positive
from kd.losses.common import match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """The normalised spatial attention map ``normalize(mean_c |f_c|^p)``, flattened.

    Args:
        f: ``(B, C, H, W)`` feature map.
        p: Exponent (the paper uses 2).

    Returns:
        ``(B, H * W)`` in fp32 (or fp64 for fp64 input), each row of unit L2 norm.
    """
    dtype = torch.promote_types(f.dtype, torch.float32)
    am = f.to(dtype).abs().pow(p).mean(dim=1)  # (B, H, W)
    return F.normalize(am.flatten(1), dim=1)  # (B, H * W)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """``mean((Q_s - Q_t)^2)`` of the normalised attention maps of one student/teacher pair.

    Args:
        f_s: ``(B, C_s, H_s, W_s)`` student feature map.
        f_t: ``(B, C_t, H_t, W_t)`` teacher feature map (detached here); the larger of the two
            is average-pooled to the spatial size of the smaller.
        p: Exponent of the attention map.

    Returns:
        A scalar tensor.
    """
    f_s, f_t = match_spatial(f_s, f_t.detach())
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class ATLoss(DistillationLoss):
    """Attention transfer: ``ce_weight * CE + weight * sum_pairs mean((Q_s - Q_t)^2)``.

    Args:
        student_nodes: Student feature maps, one per pair (the CRD recipe: every stage).
        teacher_nodes: Teacher feature maps, as many as ``student_nodes``.
        p: Exponent of the attention map ``mean_c |A_c|^p`` (> 0; the paper uses 2).
        weight: Weight of the AT term (a number or a schedule); 1000 in the CRD recipe.
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On unequal or empty node lists, ``p <= 0`` or a negative weight.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        p: float = 2.0,
        weight: float | Schedule = 1000.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        self.p = check_positive("p", p)

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Checks every paired feature is a map (an embedding has no spatial attention).

        Raises:
            ConfigError: When a paired feature is not ``(B, C, H, W)``.
        """
        assert teacher is not None, "ATLoss needs the teacher's output"
        for key, out, nodes in (("student_nodes", student, self.student_nodes),
                                ("teacher_nodes", teacher, self.teacher_nodes)):
            for n in nodes:
                if out.features[n].dim() != 4:
                    raise ConfigError(
                        key, f"AT needs (B, C, H, W) feature maps, but {n!r} has shape "
                        f"{tuple(out.features[n].shape)}; pick convolutional stages"
                    )

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "ATLoss needs the teacher's output"
        pairs = zip(self.student_nodes, self.teacher_nodes)
        loss = sum(at_loss(student.features[s], teacher.features[t], self.p) for s, t in pairs)
        return {"at": loss}

    def extra_repr(self) -> str:
        return f"p={self.p:g}, {super().extra_repr()}"
