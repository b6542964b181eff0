"""Flow of Solution Procedure (FSP): the student matches the Gram matrices between consecutive stages.

Yim, Joo, Bae and Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning", CVPR 2017 (no arXiv version). For two maps F1
``(C1, H, W)`` and F2 ``(C2, H, W)`` of one sample, the FSP matrix is

    G[i, j] = sum over (h, w) of F1[i, h, w] * F2[j, h, w] / (H * W),

and the loss penalises the squared difference of the teacher's and the student's matrices, layer
pair by layer pair. The paper uses it as a first stage (``fsp_init``: the student is trained on
it alone), then trains on the main task. Following RepDistiller (HobbitLong/RepDistiller,
``distiller_zoo/FSP.py``), the loss of a pair is the mean of the squared differences over batch
and matrix entries, the pairs' losses are summed with equal weights, and the larger of two
consecutive maps is average-pooled to the smaller spatial size. RepDistiller's matrices are the
transposes ``(C2, C1)`` of these; the loss is the same.

Main training: RepDistiller trains with cross-entropy only after the init stage (``loss_kd =
0``), so ``weight`` defaults to 0; the ``fsp`` term is still returned and can be turned on.

kd extension, connectors: the paper (and RepDistiller, which refuses otherwise) needs the same
channel count in the student and the teacher at every node. kd's default digits pair has
8/16 vs 64/128 channels, so with ``connect: auto`` a learned 1x1 convolution (no bias) maps each
mismatched student map to the teacher's channel count before its FSP matrix is formed; the
connectors train in ``fsp_init`` and are frozen in the main training (applied with detached
weights). ``connect: never`` keeps the paper's method and refuses mismatched channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import DistillationLoss, Stage, check_pairs
from kd.losses.common import as_map, feature, full_precision, match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput

CONNECT = ("auto", "never")


def fsp_matrix(f1: Tensor, f2: Tensor) -> Tensor:
    """The FSP matrix ``F1 F2^T / (H * W)`` of each sample, in fp32 even under autocast.

    Args:
        f1: ``(B, C1, H1, W1)``.
        f2: ``(B, C2, H2, W2)``; the larger map is average-pooled to the smaller size first.

    Returns:
        ``(B, C1, C2)``.
    """
    f1, f2 = match_spatial(f1, f2)
    dtype = torch.promote_types(f1.dtype, torch.float32)
    with full_precision(f1):
        a = f1.flatten(2).to(dtype)  # (B, C1, H * W)
        b = f2.flatten(2).to(dtype)  # (B, C2, H * W)
        return torch.bmm(a, b.transpose(1, 2)) / a.shape[-1]  # (B, C1, C2)


def fsp_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """``sum over consecutive pairs k of mean((G_S^k - G_T^k)^2)``.

    Args:
        student: The student's maps, shallow to deep (at least 2), channels as the teacher's.
        teacher: The teacher's maps, as many.

    Returns:
        A scalar tensor.
    """
    losses = []
    for k in range(len(student) - 1):
        g_s = fsp_matrix(student[k], student[k + 1])  # (B, C_k, C_k+1)
        g_t = fsp_matrix(teacher[k], teacher[k + 1])  # (B, C_k, C_k+1)
        losses.append((g_s - g_t).pow(2).mean())
    return torch.stack(losses).sum()


class FSPLoss(DistillationLoss):
    """FSP distillation: an ``fsp_init`` stage, then ``ce_weight * CE + weight * FSP``.

    Args:
        student_nodes: The student's stage outputs, shallow to deep (at least 2).
        teacher_nodes: The teacher's, one per student node.
        connect: ``auto`` adds a learned 1x1 conv on the student side where channel counts
            differ (kd extension); ``never`` refuses them (the paper).
        init_epochs: Epochs of the ``fsp_init`` stage (RepDistiller 30); 0 skips it.
        weight: Weight of the FSP term in the main training (0: RepDistiller's CE-only training).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On fewer than 2 nodes, unequal node counts, an unknown ``connect`` or a
            bad epoch count; in ``setup``, on mismatched channels with ``connect: never``.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        connect: str = "auto",
        init_epochs: int = 30,
        weight: float | Schedule = 0.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        if len(self.student_nodes) < 2:
            raise ConfigError(
                "student_nodes", f"FSP relates consecutive layers, so it needs >= 2 nodes per model, "
                f"got {list(self.student_nodes)} and {list(self.teacher_nodes)}"
            )
        if connect not in CONNECT:
            raise ConfigError("connect", f"must be one of {', '.join(CONNECT)}, got {connect!r}")
        self.connect = connect
        self.init_epochs = check_int("init_epochs", init_epochs, 0, valid=">= 0")
        self.connectors = nn.ModuleList()  # filled by setup()

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Checks channel counts and builds the student-side connectors where they differ.

        Raises:
            ConfigError: With ``connect: never``, if any pair's channel counts differ.
        """
        assert teacher is not None, "FSPLoss needs the teacher's output"
        c_s = [feature(student, n, "student_nodes").shape[1] for n in self.student_nodes]
        f_t = [as_map(feature(teacher, n, "teacher_nodes")) for n in self.teacher_nodes]
        c_t = [f.shape[1] for f in f_t]
        if self.connect == "never" and c_s != c_t:
            raise ConfigError(
                "student_nodes", f"FSP needs equal channel counts in student and teacher at each "
                f"node, got student {c_s} vs teacher {c_t}; pick matching nodes or set connect: auto"
            )
        del self.connectors[:]
        for s, t, f in zip(c_s, c_t, f_t):
            connector = nn.Identity() if s == t else nn.Conv2d(s, t, kernel_size=1, bias=False)
            self.connectors.append(connector.to(f.device))

    def _student_maps(self, student: ModelOutput, frozen: bool) -> list[Tensor]:
        if len(self.connectors) != len(self.student_nodes):
            raise RuntimeError("FSPLoss.setup() must run before the loss is used")
        maps = []
        for name, connector in zip(self.student_nodes, self.connectors):
            f = as_map(student.features[name])  # (B, C_s, H, W)
            if isinstance(connector, nn.Conv2d):
                f = F.conv2d(f, connector.weight.detach()) if frozen else connector(f)  # (B, C_t, H, W)
            maps.append(f)
        return maps

    def fsp(self, student: ModelOutput, teacher: ModelOutput, frozen: bool = False) -> Tensor:
        """The FSP loss of the student against the teacher.

        Args:
            student: The student's output.
            teacher: The teacher's output.
            frozen: Apply the connectors with detached weights (the main training).
        """
        t_maps = [as_map(teacher.features[n]).detach() for n in self.teacher_nodes]
        return fsp_loss(self._student_maps(student, frozen), t_maps)

    def init_loss(
        self, student: ModelOutput | None, teacher: ModelOutput, batch: Batch
    ) -> dict[str, Tensor]:
        """The ``fsp_init`` stage's loss ``{"fsp": ...}`` (connectors trained)."""
        assert student is not None, "the fsp_init stage trains the student"
        return {"fsp": self.fsp(student, teacher)}

    def stages(self) -> list[Stage]:
        """The ``fsp_init`` stage: student and connectors trained on the FSP loss alone."""
        if self.init_epochs == 0:
            return []
        return [
            Stage(
                name="fsp_init",
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
        assert teacher is not None, "FSPLoss needs the teacher's output"
        return {"fsp": self.fsp(student, teacher, frozen=True)}

    def extra_repr(self) -> str:
        return f"connect={self.connect}, init_epochs={self.init_epochs}, {super().extra_repr()}"
