"""OFD: the overhaul of feature distillation (margin ReLU on the teacher, partial L2 distance).

Heo, Kim, Yun, Park, Kwak and Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV
2019, arXiv:1904.01866. The student's pre-ReLU feature, through a connector (1x1 conv + BN),
regresses the teacher's pre-ReLU feature after the margin ReLU ``max(t, m)`` (eq. 2), with the
partial L2 distance of eq. 4: a position counts unless both the target and the student are
non-positive and the student lies below the target, i.e. unless the ReLU would hide the error.

The margin ``m`` of each channel (eq. 3) is the expected value of the teacher's pre-ReLU response
over its negative part, ``E[x | x < 0]`` for ``x ~ N(mu, sigma^2)``:
``mu - sigma * phi(mu / sigma) / Phi(-mu / sigma)``, or ``-3 sigma`` where ``Phi(-mu / sigma) <=
0.001``. The authors read ``mu, sigma`` from the beta and |gamma| of the BN before the teacher's
ReLU. kd cannot know which BN feeds a node (a residual add sums two branches), so it estimates
the per-channel mean and standard deviation of the teacher's pre-ReLU feature itself from the
first training batch (over batch and space, before any pooling, across processes under
distributed training) and applies the same formula; the margins are buffers, saved in
checkpoints. For a feature that is a BN output under batch statistics this is exactly the
paper's value (the mean is beta and the std |gamma|, up to BN's epsilon); with kd's eval-mode
teacher it is the margin of the distribution the student actually sees.

Loss as in the authors' CIFAR code (clovaai/overhaul-distillation) and mdistiller: the distance
summed over channels and positions, averaged over the batch, layer ``i`` of ``n`` weighted by
``2^-(n - i - 1)`` (the deepest layer counts most), and the sum scaled by ``weight = 1e-3`` (the
authors' ``/ batch_size / 1000``). Deviation: where the spatial sizes differ, kd average-pools
the larger map to the smaller (mdistiller resizes the teacher's map to the student's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kd.losses.base import DistillationLoss, check_pairs, node_list
from kd.losses.common import conv_bn, feature, match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput

MIN_NEGATIVE_MASS = 1e-3  # below this P(x < 0), the paper's margin is -3 sigma


def ofd_margin(mean: Tensor, std: Tensor) -> Tensor:
    """The margin of eq. 3: ``E[x | x < 0]`` for ``x ~ N(mean, std^2)``, per channel.

    ``mean - std * phi(mean / std) / Phi(-mean / std)``, or ``-3 * std`` where
    ``Phi(-mean / std) <= 0.001`` (almost no negative responses to average over).

    Args:
        mean: ``(C,)`` per-channel means.
        std: ``(C,)`` per-channel standard deviations (their absolute value is used, like the
            authors' ``abs(gamma)``).

    Returns:
        ``(C,)`` margins, all <= 0.
    """
    mean = mean.float()
    std = std.float().abs().clamp_min(torch.finfo(torch.float32).tiny)
    z = mean / std
    negative_mass = torch.special.ndtr(-z)  # Phi(-mu / sigma) = P(x < 0)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    conditional = mean - std * pdf / negative_mass.clamp_min(MIN_NEGATIVE_MASS)
    return torch.where(negative_mass > MIN_NEGATIVE_MASS, conditional, -3.0 * std)


def ofd_loss(f_s: Tensor, f_t: Tensor, margin: Tensor) -> Tensor:
    """Partial L2 distance between ``f_s`` and the margin-ReLU'd teacher, summed, batch-averaged.

    With ``target = max(f_t, m)``: ``sum_{c,h,w} (f_s - target)^2 * [f_s > target or target > 0]
    / B``. For ``m < 0`` this is mdistiller's three cases: ``(f_s - m)^2`` where ``f_t <= m < f_s``,
    ``(f_s - f_t)^2`` where ``m < f_t <= 0`` and ``f_s > f_t``, ``(f_s - f_t)^2`` where ``f_t > 0``.

    Args:
        f_s: ``(B, C, H, W)`` the student's feature after the connector.
        f_t: ``(B, C, H, W)`` the teacher's pre-ReLU feature.
        margin: ``(C,)`` the teacher's margins.

    Returns:
        A scalar tensor (fp32 at least).
    """
    dtype = torch.promote_types(f_s.dtype, torch.float32)
    f_s = f_s.to(dtype)
    target = torch.maximum(f_t.to(dtype), margin.to(dtype)[None, :, None, None])  # (B, C, H, W)
    mask = (f_s > target) | (target > 0)
    return ((f_s - target).pow(2) * mask).sum() / f_s.shape[0]


def channel_mean_std(f: Tensor, distributed: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of ``f`` over batch and space.

    Args:
        f: ``(B, C, H, W)`` or ``(B, C)``.
        distributed: Pool the statistics of all processes (collective: every process calls it).

    Returns:
        ``(C,)`` means and ``(C,)`` standard deviations, fp32.
    """
    x = f.detach().float().transpose(0, 1).reshape(f.shape[1], -1)  # (C, B*H*W)
    count = torch.tensor(float(x.shape[1]), device=x.device, dtype=x.dtype)  # not bf16-true's default
    total = x.sum(dim=1)  # (C,)
    if distributed:
        dist.all_reduce(count)
        dist.all_reduce(total)
    mean = total / count
    squares = (x - mean[:, None]).pow(2).sum(dim=1)  # (C,)
    if distributed:
        dist.all_reduce(squares)
    return mean, (squares / count).sqrt()


class OFDLoss(DistillationLoss):
    """OFD: ``ce_weight * CE + weight * sum_i 2^-(n-i-1) * partial_L2(connector_i(s_i), max(t_i, m_i))``.

    ``student_nodes`` and ``teacher_nodes`` are pre-ReLU features, paired in order (shallow to
    deep). ``setup`` builds a 1x1 conv + BN connector per pair (OFD's initialisation, see
    ``kd.losses.common.conv_bn``) and the margin buffers, which the first call in training mode
    fills from the teacher's features (calls in eval mode before that use the batch's own
    estimate without storing it).

    Args:
        student_nodes: The student's pre-ReLU features.
        teacher_nodes: The teacher's pre-ReLU features, as many.
        weight: Weight of the distillation term; 1e-3 is the authors' ``/ 1000`` (mdistiller
            ``OFD.LOSS.FEAT_WEIGHT``).
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On unequal node counts or bad weights.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        weight: float | Schedule = 1e-3,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes)
        check_pairs(node_list("student_nodes", student_nodes), node_list("teacher_nodes", teacher_nodes))
        self.connectors = nn.ModuleList()  # built in setup
        self.register_buffer("margins_estimated", torch.tensor(False))
        self._margins_ready = False

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds the connectors (student channels -> teacher channels) and the margin buffers.

        Raises:
            ConfigError: If a feature is not a ``(B, C, H, W)`` map.
        """
        assert teacher is not None, "OFD needs the teacher's output"
        f_s = [feature(student, n, "student_nodes", dims=(4,)) for n in self.student_nodes]  # pre-ReLU maps
        f_t = [feature(teacher, n, "teacher_nodes", dims=(4,)) for n in self.teacher_nodes]
        device = f_s[0].device
        self.connectors = nn.ModuleList(conv_bn(s.shape[1], t.shape[1]) for s, t in zip(f_s, f_t)).to(device)
        for i, t in enumerate(f_t):
            self.register_buffer(f"margin{i}", torch.zeros(t.shape[1], device=device))
        self.margins_estimated = torch.tensor(False, device=device)
        self._margins_ready = False

    def margins(self, f_t: Sequence[Tensor]) -> list[Tensor]:
        """The per-channel margins, estimated from ``f_t`` and stored on the first training call."""
        if not self._margins_ready and bool(self.margins_estimated):
            self._margins_ready = True  # loaded from a checkpoint
        if self._margins_ready:
            return [getattr(self, f"margin{i}") for i in range(len(f_t))]
        distributed = self.training and dist.is_available() and dist.is_initialized()
        estimates = [ofd_margin(*channel_mean_std(t, distributed)) for t in f_t]
        if self.training:
            for i, m in enumerate(estimates):
                getattr(self, f"margin{i}").copy_(m)
            self.margins_estimated.fill_(True)
            self._margins_ready = True
        return estimates

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "OFD needs the teacher's output"
        if len(self.connectors) != len(self.student_nodes):
            raise RuntimeError("OFDLoss.setup must run (with the dry-run outputs) before the loss")
        f_t = [teacher.features[n].detach() for n in self.teacher_nodes]
        margins = self.margins(f_t)
        n = len(f_t)
        total = f_t[0].new_zeros((), dtype=torch.float32)
        for i, (name, t, m, connector) in enumerate(zip(self.student_nodes, f_t, margins, self.connectors)):
            s, t = match_spatial(connector(student.features[name]), t)  # (B, C_t, H, W) each
            total = total + ofd_loss(s, t, m) / 2 ** (n - i - 1)
        return {"ofd": total}

    def extra_repr(self) -> str:
        margins = "estimated" if self._margins_ready or bool(self.margins_estimated) else "pending"
        return f"pairs={len(self.student_nodes)}, margins={margins}, {super().extra_repr()}"
