"""Neuron selectivity transfer: the student matches the distribution of the teacher's channels.

Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv:1707.01219, 2017. Each channel of a ``(C, H, W)`` feature map is one sample: its ``H * W``
responses, L2-normalised over space. The loss is the squared maximum mean discrepancy between
the student's and the teacher's sets of channels,

    MMD^2 = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') - 2 mean_{i,j} k(t_i, s_j),

with the paper's polynomial kernel ``k(x, y) = (x^T y + c)^d``, d = 2, c = 0 (the paper also
tries linear and Gaussian kernels; the CRD benchmark uses this one). The two sets may have
different sizes, so channel counts need not agree; spatial sizes must, and a pair whose
resolutions differ is matched by average-pooling the larger map to the smaller
(``kd.losses.common.match_spatial``).

As RepDistiller (``distiller_zoo/NST.py``, the CRD benchmark): the full MMD is computed per
sample and averaged over the batch, summed over every stage, with ``weight`` 50 on MMD^2 itself
(the paper writes ``lambda / 2``). RepDistiller detaches the teacher-teacher term only; kd
detaches the teacher's features outright (the same for a frozen teacher, and no gradient can
ever reach it). The kernels are computed in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_pairs
from kd.losses.common import full_precision, match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """The polynomial kernel ``(a_i^T b_j)^2`` between every pair of rows, per sample.

    Args:
        a: ``(B, N, D)``.
        b: ``(B, M, D)``.

    Returns:
        ``(B, N, M)``.
    """
    return (a @ b.transpose(1, 2)).pow(2)


def nst_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Squared MMD between the student's and the teacher's spatially normalised channels.

    Args:
        f_s: ``(B, C_s, H_s, W_s)`` student feature map.
        f_t: ``(B, C_t, H_t, W_t)`` teacher feature map (detached here); the larger of the two
            is average-pooled to the spatial size of the smaller.

    Returns:
        A scalar tensor: the batch mean of each sample's MMD^2.
    """
    f_s, f_t = match_spatial(f_s, f_t.detach())
    dtype = torch.promote_types(f_s.dtype, torch.float32)
    s = F.normalize(f_s.to(dtype).flatten(2), dim=2)  # (B, C_s, H * W)
    t = F.normalize(f_t.to(dtype).flatten(2), dim=2)  # (B, C_t, H * W)
    # Out of autocast: a bf16 product would round away the differences the loss measures.
    with full_precision(s):
        tt = poly_kernel(t, t).mean()
        ss = poly_kernel(s, s).mean()
        st = poly_kernel(s, t).mean()
    return tt + ss - 2 * st


class NSTLoss(DistillationLoss):
    """Neuron selectivity transfer: ``ce_weight * CE + weight * sum_pairs MMD^2(s, t)``.

    Args:
        student_nodes: Student feature maps, one per pair (the CRD recipe: every stage).
        teacher_nodes: Teacher feature maps, as many as ``student_nodes``.
        weight: Weight of the NST term (a number or a schedule); 50 in the CRD recipe.
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On unequal or empty node lists or a negative weight.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        weight: float | Schedule = 50.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Checks every paired feature is a map (a channel of an embedding has one value).

        Raises:
            ConfigError: When a paired feature is not ``(B, C, H, W)``.
        """
        assert teacher is not None, "NSTLoss needs the teacher's output"
        for key, out, nodes in (("student_nodes", student, self.student_nodes),
                                ("teacher_nodes", teacher, self.teacher_nodes)):
            for n in nodes:
                if out.features[n].dim() != 4:
                    raise ConfigError(
                        key, f"NST needs (B, C, H, W) feature maps, but {n!r} has shape "
                        f"{tuple(out.features[n].shape)}; pick convolutional stages"
                    )

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "NSTLoss needs the teacher's output"
        pairs = zip(self.student_nodes, self.teacher_nodes)
        return {"nst": sum(nst_loss(student.features[s], teacher.features[t]) for s, t in pairs)}

    def extra_repr(self) -> str:
        return f"kernel=(x.y)^2, pairs={len(self.student_nodes)}, {super().extra_repr()}"
