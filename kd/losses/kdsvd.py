"""KD-SVD: the student matches how the teacher's leading singular vectors relate across layers.

Lee, Kim and Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition",
ECCV 2018. Each feature map is decomposed by SVD and its leading right-singular vectors kept
(``k`` of the teacher's, ``k + 3`` of the student's, each student vector aligned to the teacher
vector it is most parallel to, sign included); the knowledge is the relation between consecutive
layers: an RBF ``exp(-(v_i[a] - v_{i-1}[b])^2 / 8)`` between every element of layer i's vectors
and every element of layer i-1's, and the loss is the squared difference of the student's and
the teacher's relations, summed and divided by the batch size, over each pair of consecutive
layers.

As mdistiller (``mdistiller/distillers/KDSVD.py``, the implementation of the CRD/DKD lineage,
CIFAR-100 defaults k 1, weight 1, CE weight 1, on the outputs of the three stages), which differs
from the authors' TensorFlow code in two ways kd keeps: an ``(B, C, H, W)`` map is decomposed as a
``(C*H) x W`` matrix, so the vectors run over the map's width (the TF code decomposes the
``(H*W) x C`` matrix of NHWC maps, vectors over channels), and the singular values weigh the
vectors after an L2 normalisation over the first ``k`` of them (with k = 1, a weight of 1).
Non-finite entries of the SVD and of the loss are set to 0 (the forward values only, as there).
A pair of layers whose widths differ between student and teacher is matched by average-pooling
the larger map to the smaller (mdistiller would fail). The SVD runs in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError, check_int
from kd.losses.base import DistillationLoss, check_pairs
from kd.losses.common import full_precision, match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_vectors(feat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` leading right-singular vectors of each sample's ``(C*H) x W`` matrix, L2-normalised,
    and the ``n`` leading singular values, L2-normalised over the ``n``.

    Args:
        feat: ``(B, C, H, W)``.
        n: How many to keep.

    Returns:
        ``v`` of shape ``(B, W, n)`` and ``s`` of shape ``(B, n)``.
    """
    b, c, h, w = feat.shape
    _, s, vh = torch.linalg.svd(feat.reshape(b, c * h, w).float(), full_matrices=False)
    v = _finite(vh.transpose(-2, -1))  # (B, W, min(C*H, W))
    s = _finite(s)
    return F.normalize(v[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1)


def align(v_s: Tensor, v_t: Tensor) -> Tensor:
    """For each teacher vector, the student vector with the largest ``|cos|`` to it, times the sign
    of that cosine (tied candidates are summed, as the reference's mask does).

    Args:
        v_s: ``(B, W, m)`` student vectors.
        v_t: ``(B, W, k)`` teacher vectors.

    Returns:
        ``(B, W, k)``.
    """
    cosine = v_s.transpose(-2, -1) @ v_t  # (B, m, k)
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


def kdsvd_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], k: int) -> Tensor:
    """The KD-SVD loss over consecutive layers (see the module docstring).

    Args:
        student_maps: ``(B, C_i, H_i, W_i)`` per layer.
        teacher_maps: The teacher's maps of the same layers (detached here).
        k: Teacher vectors per layer (the student keeps ``k + 3``).

    Returns:
        A scalar tensor.
    """
    loss = student_maps[0].new_zeros((), dtype=torch.float32)
    before: tuple[Tensor, Tensor] | None = None
    with full_precision(loss):  # fp32 SVD and products, also under autocast
        for f_s, f_t in zip(student_maps, teacher_maps):
            f_s, f_t = match_spatial(f_s, f_t.detach())
            v_t, s_t = leading_vectors(f_t, k)
            v_s, _ = leading_vectors(f_s, k + 3)
            v_s = align(v_s, v_t)
            v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
            if before is not None:
                s_rbf = torch.exp(-(v_s.unsqueeze(2) - before[0].unsqueeze(1)).pow(2) / 8)  # (B, W_i, W_{i-1}, k)
                t_rbf = torch.exp(-(v_t.unsqueeze(2) - before[1].unsqueeze(1)).pow(2) / 8)
                loss = loss + _finite((s_rbf - t_rbf.detach()).pow(2)).sum() / f_s.shape[0]
            before = (v_s, v_t)
    return loss


class KDSVDLoss(DistillationLoss):
    """KD-SVD: ``ce_weight * CE + weight * kdsvd_loss(student maps, teacher maps)``.

    Args:
        student_nodes: Student feature maps, two or more in depth order (mdistiller: every stage).
        teacher_nodes: The teacher's maps of the same layers, as many.
        k: Singular vectors kept of the teacher (the student keeps k + 3); mdistiller: 1.
        weight: Weight of the KD-SVD term (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On fewer than two pairs, unequal node lists, a bad ``k`` or a negative weight.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        k: int = 1,
        weight: float | Schedule = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes)
        check_pairs(self.student_nodes, self.teacher_nodes)
        if len(self.student_nodes) < 2:
            raise ConfigError("student_nodes", "KD-SVD relates consecutive layers: give at least two maps")
        self.k = check_int("k", k, 1, valid=">= 1")

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Checks every paired feature is a map with at least ``k`` columns.

        Raises:
            ConfigError: When a paired feature is not ``(B, C, H, W)`` or is narrower than ``k``.
        """
        assert teacher is not None, "KDSVDLoss needs the teacher's output"
        for key, out, nodes in (("student_nodes", student, self.student_nodes),
                                ("teacher_nodes", teacher, self.teacher_nodes)):
            for n in nodes:
                shape = tuple(out.features[n].shape)
                if len(shape) != 4 or shape[3] < self.k:
                    raise ConfigError(key, f"KD-SVD needs (B, C, H, W) maps at least k={self.k} wide, but {n!r} has "
                                      f"shape {shape}; pick convolutional stages")

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        assert teacher is not None, "KDSVDLoss needs the teacher's output"
        maps_s = [student.features[n] for n in self.student_nodes]
        maps_t = [teacher.features[n] for n in self.teacher_nodes]
        return {"kdsvd": kdsvd_loss(maps_s, maps_t, self.k)}

    def extra_repr(self) -> str:
        return f"k={self.k}, layers={len(self.student_nodes)}, {super().extra_repr()}"
