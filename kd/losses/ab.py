"""Activation Boundaries (AB): the student's neurons learn on which side of zero the teacher's are.

Heo, Lee, Yun and Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
Hidden Neurons", AAAI 2019, arXiv:1811.03233. The paper's alternative loss on pre-activation
(pre-ReLU) values, with the student's map first sent through a connector r (1x1 conv + BN) to
the teacher's channels, and margin mu:

    L(s, t) = sum over elements of  (s + mu)^2 * [s > -mu and t <= 0]
                                  + (s - mu)^2 * [s <= mu and t > 0]

It pushes a student value below -mu where the teacher's neuron is off and above +mu where it is
on. The paper uses it as an initialisation: stage ``ab_init`` trains the student (and the
connectors) on it alone, then ordinary training follows.

Scaling as the authors' CIFAR script (bhheo/AB_distillation) and RepDistiller's ``ABLoss``
(HobbitLong/RepDistiller, ``distiller_zoo/AB.py``): layer i of n (shallow to deep) is weighted
``2^(i - n + 1)`` (the deepest 1, the one before 1/2, ...), each layer's sum is divided by the
batch size, and the total is multiplied by 3/1000.

Connectors: identity where the channel counts already agree (as both references), else
``kd.losses.common.conv_bn`` (the authors' 1x1 conv + BN and its init). Maps of different
spatial sizes are average-pooled to the smaller size after the connector (RepDistiller uses a
strided convolution in that case instead; the authors' pairs always match).

Main training: RepDistiller trains with cross-entropy only after the init stage (``loss_kd =
0``), so ``weight`` defaults to 0. The ``ab`` term is still returned (and logged) and can be
turned on with ``weight``; the connectors are then frozen as in RepDistiller (not in its
optimizer, BN in eval mode): the main loss applies them with detached parameters and BN
running statistics, so gradients reach the student's features but never the connectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import check_int
from kd.losses.base import DistillationLoss, Stage, check_pairs, check_positive
from kd.losses.common import as_map, conv_bn, feature, match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput

SCALE = 3 / 1000
"""The overall factor of the authors' CIFAR script and RepDistiller (``loss / 1000 * 3``)."""


def alternative_l2(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """The AB margin loss of one layer, summed over elements and averaged over the batch.

    Args:
        source: The student's (connected) pre-activation map ``(B, C, H, W)``.
        target: The teacher's pre-activation map, same shape; only its sign is used.
        margin: mu > 0.

    Returns:
        A scalar tensor ``sum(...) / B``, 0 when every student value lies beyond the margin
        on the teacher's side (``s <= -mu`` where ``t <= 0``, ``s > mu`` where ``t > 0``).
    """
    dtype = torch.promote_types(source.dtype, torch.float32)
    s = source.to(dtype)
    off = (target <= 0) & (s > -margin)  # teacher neuron off, student not far enough below
    on = (target > 0) & (s <= margin)  # teacher neuron on, student not far enough above
    loss = (s + margin).pow(2) * off + (s - margin).pow(2) * on  # (B, C, H, W)
    return loss.sum() / source.shape[0]


def layer_weights(n: int) -> list[float]:
    """``[2^(i - n + 1) for i in range(n)]``: 1 for the deepest layer, halving towards the input."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def _frozen(connector: nn.Module, x: Tensor) -> Tensor:
    """The connector with its parameters detached and its BN in eval mode (the main stage)."""
    if isinstance(connector, nn.Identity):
        return x
    conv, bn = connector[0], connector[1]
    y = F.conv2d(x, conv.weight.detach())
    return F.batch_norm(
        y, bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(), training=False, eps=bn.eps
    )


class ABLoss(DistillationLoss):
    """Activation-boundary distillation: an ``ab_init`` stage, then ``ce_weight * CE + weight * AB``.

    Args:
        student_nodes: The student's pre-activation maps, shallow to deep.
        teacher_nodes: The teacher's, one per student node.
        margin: mu > 0 of the alternative loss (the paper's 1.0).
        init_epochs: Epochs of the ``ab_init`` stage (RepDistiller 30); 0 skips it.
        weight: Weight of the AB term in the main training (0: RepDistiller's CE-only training).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On a bad margin, epoch count or node lists.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        margin: float = 1.0,
        init_epochs: int = 30,
        weight: float | Schedule = 0.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        self.margin = check_positive("margin", margin)
        self.init_epochs = check_int("init_epochs", init_epochs, 0, valid=">= 0")
        self.layer_weights = layer_weights(len(self.student_nodes))
        self.connectors = nn.ModuleList()  # filled by setup()

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds a connector per pair: identity on equal channel counts, else 1x1 conv + BN."""
        assert teacher is not None, "ABLoss needs the teacher's output"
        del self.connectors[:]
        for s_name, t_name in zip(self.student_nodes, self.teacher_nodes):
            c_s = feature(student, s_name, "student_nodes").shape[1]
            f_t = feature(teacher, t_name, "teacher_nodes")
            connector = nn.Identity() if c_s == f_t.shape[1] else conv_bn(c_s, f_t.shape[1])
            self.connectors.append(connector.to(f_t.device))

    def ab_loss(self, student: ModelOutput, teacher: ModelOutput, frozen: bool = False) -> Tensor:
        """The weighted alternative loss over all pairs.

        Args:
            student: The student's output.
            teacher: The teacher's output.
            frozen: Apply the connectors with detached parameters and eval-mode BN.
        """
        if len(self.connectors) != len(self.student_nodes):
            raise RuntimeError("ABLoss.setup() must run before the loss is used")
        losses = []
        pairs = zip(self.student_nodes, self.teacher_nodes, self.connectors, self.layer_weights)
        for s_name, t_name, connector, w in pairs:
            f_s = as_map(student.features[s_name])  # (B, C_s, H_s, W_s)
            f_t = as_map(teacher.features[t_name]).detach()  # (B, C_t, H_t, W_t)
            g_s = _frozen(connector, f_s) if frozen else connector(f_s)  # (B, C_t, H_s, W_s)
            g_s, f_t = match_spatial(g_s, f_t)
            losses.append(w * alternative_l2(g_s, f_t, self.margin))
        return torch.stack(losses).sum() * SCALE

    def init_loss(
        self, student: ModelOutput | None, teacher: ModelOutput, batch: Batch
    ) -> dict[str, Tensor]:
        """The ``ab_init`` stage's loss ``{"ab": ...}`` (connectors trained)."""
        assert student is not None, "the ab_init stage trains the student"
        return {"ab": self.ab_loss(student, teacher)}

    def stages(self) -> list[Stage]:
        """The ``ab_init`` stage: student and connectors trained on the AB loss alone."""
        if self.init_epochs == 0:
            return []
        return [
            Stage(
                name="ab_init",
                epochs=self.init_epochs,
                loss=self.init_loss,
                modules=[self.connectors],
                train_student=True,
                freeze_after=True,  # fixed in the main stage, as in RepDistiller
            )
        ]

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "ABLoss needs the teacher's output"
        return {"ab": self.ab_loss(student, teacher, frozen=True)}

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}, init_epochs={self.init_epochs}, {super().extra_repr()}"
