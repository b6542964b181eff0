"""ReviewKD: knowledge review with attention-based fusion and a hierarchical context loss.

Chen, Liu, Zhao and Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021,
arXiv:2104.09044. Each student stage (and the pooled embedding, as a 1x1 map) is "reviewed"
together with the deeper stages: a residual path runs from the deepest level to the shallowest,
and at each level an attention-based fusion (ABF, section 3.3) merges the level's own feature
with the upsampled residual from below. Every fused level is mapped to the teacher's channels and
size and compared with the teacher's feature of the same level by the hierarchical context loss
(HCL, section 3.4): the MSE at full resolution plus the MSEs of 4x4, 2x2 and 1x1 average-pooled
pyramids, weighted 1, 1/2, 1/4, 1/8 and normalised by the sum of the weights used.

Follows the CIFAR code of the authors (dvlab-research/ReviewKD) and mdistiller: ABF = 1x1
conv-BN to ``min(512, C of the deepest input)`` channels, attention ``conv1x1 -> 2 maps ->
sigmoid`` over the concatenation with the nearest-upsampled residual, nearest resize to the
teacher's size, then 3x3 conv-BN to the teacher's channels; student post-ReLU stages plus the
pooled embedding against the teacher's pre-ReLU stages plus its pooled embedding. Deviations:
the sizes ("shapes", "out_shapes") come from the features themselves instead of per-architecture
tables, and a pyramid level ``l`` is used when ``l < min(H, W)`` (the reference tests ``l < H``,
the same for square maps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError, check_int
from kd.losses.base import DistillationLoss, check_pairs, node_list
from kd.losses.common import as_map
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput

PYRAMID_LEVELS = (4, 2, 1)


def hcl_loss(f_s: Tensor, f_t: Tensor, levels: Sequence[int] = PYRAMID_LEVELS) -> Tensor:
    """Hierarchical context loss of one pair of maps of the same shape.

    ``(MSE(f_s, f_t) + sum_k 2^-k MSE(pool_{l_k}(f_s), pool_{l_k}(f_t))) / (1 + sum_k 2^-k)``,
    where ``l_1, l_2, ...`` are the entries of ``levels`` smaller than ``min(H, W)``, in order,
    and ``pool_l`` is adaptive average pooling to ``l x l``.

    Args:
        f_s: ``(B, C, H, W)`` the student's (fused) map.
        f_t: ``(B, C, H, W)`` the teacher's map.
        levels: Pyramid sizes, largest first.

    Returns:
        A scalar tensor (fp32 at least).
    """
    dtype = torch.promote_types(f_s.dtype, torch.float32)
    f_s, f_t = f_s.to(dtype), f_t.to(dtype)
    loss = F.mse_loss(f_s, f_t)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= min(f_s.shape[-2:]):
            continue
        weight /= 2.0
        pooled_s = F.adaptive_avg_pool2d(f_s, level)  # (B, C, level, level)
        pooled_t = F.adaptive_avg_pool2d(f_t, level)
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


class ABF(nn.Module):
    """Attention-based fusion of one level with the residual from the deeper levels.

    Args:
        in_channels: Channels of this level's student feature.
        mid_channels: Channels of the residual path.
        out_channels: Channels of the teacher's feature at this level.
        fuse: Whether a residual from a deeper level comes in (False for the deepest level).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Fuses ``x`` with ``residual`` and maps the result to the teacher's channels and size.

        Args:
            x: ``(B, C_in, H, W)`` this level's student feature.
            residual: ``(B, C_mid, H', W')`` the residual from the deeper level; None (and
                ignored) for the deepest level.
            out_size: ``(H_t, W_t)``, the teacher's size at this level.

        Returns:
            ``(B, C_out, H_t, W_t)`` the output compared with the teacher, and ``(B, C_mid, H_t,
            W_t)`` the residual passed to the next, shallower level.
        """
        x = self.conv1(x)  # (B, C_mid, H, W)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the deeper level")
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")  # (B, C_mid, H, W)
            att = self.att_conv(torch.cat([x, residual], dim=1))  # (B, 2, H, W)
            x = x * att[:, :1] + residual * att[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")  # (B, C_mid, H_t, W_t)
        return self.conv2(x), x


class ReviewKDLoss(DistillationLoss):
    """ReviewKD: ``ce_weight * CE + weight * sum_levels HCL(ABF review of the student, teacher)``.

    The levels are the stages in ``student_nodes`` / ``teacher_nodes`` (shallow to deep) and then
    the pooled embeddings ``student_pooled`` / ``teacher_pooled`` as 1x1 maps; the base class
    reads ``student_nodes = [*student_nodes, student_pooled]`` (the teacher's likewise).
    ``setup`` builds one ABF per level from the dry-run shapes. mdistiller's CIFAR recipe is
    weight 1 with a 20-epoch linear warm-up (``kd.losses.schedules.LinearWarmup``) and CE weight
    1; the authors raise the weight to 5 for resnet32x4 -> resnet8x4 and the WRN pairs.

    Args:
        student_nodes: The student's stages, shallow to deep (post-ReLU in the reference).
        teacher_nodes: The teacher's stages, as many, shallow to deep (pre-ReLU in the reference).
        student_pooled: The student's pooled embedding ``(B, C)`` before the classifier.
        teacher_pooled: The teacher's pooled embedding ``(B, C)``.
        weight: Weight of the review term (a number or a schedule).
        ce_weight: Weight of the hard-label cross-entropy.
        max_mid_channels: Cap on the residual path's width, which is ``min(max_mid_channels,
            C of the student's pooled embedding)``.

    Raises:
        ConfigError: On unequal stage counts, a missing pooled node, bad weights or widths.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        student_pooled: str,
        teacher_pooled: str,
        weight: float | Schedule = 1.0,
        ce_weight: float = 1.0,
        max_mid_channels: int = 512,
    ) -> None:
        stages_s = node_list("student_nodes", student_nodes)
        stages_t = node_list("teacher_nodes", teacher_nodes)
        check_pairs(stages_s, stages_t)
        for key, name in (("student_pooled", student_pooled), ("teacher_pooled", teacher_pooled)):
            if not isinstance(name, str) or not name:
                raise ConfigError(key, f"must be one node name (the pooled embedding), got {name!r}")
        super().__init__(
            ce_weight=ce_weight,
            weight=weight,
            student_nodes=[*stages_s, student_pooled],
            teacher_nodes=[*stages_t, teacher_pooled],
        )
        self.max_mid_channels = check_int("max_mid_channels", max_mid_channels, 1, valid=">= 1")
        self.abfs = nn.ModuleList()  # one per level, shallow to deep; built in setup

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds one ABF per level: student channels in, teacher channels out.

        Raises:
            ConfigError: If a stage is not a ``(B, C, H, W)`` map or a pooled node is neither
                ``(B, C)`` nor ``(B, C, 1, 1)``.
        """
        assert teacher is not None, "ReviewKD needs the teacher's output"
        f_s = self._maps(student, self.student_nodes, "student")
        f_t = self._maps(teacher, self.teacher_nodes, "teacher")
        in_channels = [f.shape[1] for f in f_s]
        mid_channels = min(self.max_mid_channels, in_channels[-1])
        last = len(f_s) - 1
        self.abfs = nn.ModuleList(
            ABF(c_in, mid_channels, f.shape[1], fuse=i < last) for i, (c_in, f) in enumerate(zip(in_channels, f_t))
        ).to(f_s[0].device)

    def review(self, f_s: Sequence[Tensor], out_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """The review path: from the deepest level to the shallowest, each fused with the deeper ones.

        Args:
            f_s: The student's maps, shallow to deep (the pooled embedding last, as ``(B, C, 1, 1)``).
            out_sizes: The teacher's ``(H, W)`` at each level, in the same order.

        Returns:
            One map per level, shallow to deep, with the teacher's channels and size.
        """
        if len(self.abfs) != len(f_s):
            raise RuntimeError("ReviewKDLoss.setup must run (with the dry-run outputs) before the loss")
        outs: list[Tensor] = []
        residual: Tensor | None = None
        for abf, x, size in zip(reversed(self.abfs), reversed(f_s), reversed(out_sizes)):
            out, residual = abf(x, residual, size)
            outs.append(out)
        return outs[::-1]

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "ReviewKD needs the teacher's output"
        f_s = [as_map(student.features[n]) for n in self.student_nodes]
        f_t = [as_map(teacher.features[n]).detach() for n in self.teacher_nodes]
        outs = self.review(f_s, [f.shape[-2:] for f in f_t])
        return {"reviewkd": torch.stack([hcl_loss(o, t) for o, t in zip(outs, f_t)]).sum()}

    @staticmethod
    def _maps(out: ModelOutput, nodes: Sequence[str], who: str) -> list[Tensor]:
        maps = []
        for i, name in enumerate(nodes):
            f = out.features[name]
            pooled = i == len(nodes) - 1
            if pooled and not (f.dim() == 2 or (f.dim() == 4 and f.shape[-2:] == (1, 1))):
                raise ConfigError(
                    f"{who}_pooled", f"{name!r} must be a pooled embedding (B, C), got shape {tuple(f.shape)}"
                )
            if not pooled and f.dim() != 4:
                raise ConfigError(
                    f"{who}_nodes", f"{name!r} must be a (B, C, H, W) stage output, got shape {tuple(f.shape)}"
                )
            maps.append(as_map(f))
        return maps

    def extra_repr(self) -> str:
        return f"max_mid_channels={self.max_mid_channels}, {super().extra_repr()}"
