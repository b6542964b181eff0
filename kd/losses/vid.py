"""Variational information distillation: maximise a bound on teacher-student mutual information.

Ahn, Hu, Damianou, Lawrence and Dai, "Variational Information Distillation for Knowledge
Transfer", CVPR 2019, arXiv:1904.05835. The mutual information between a teacher feature ``t``
and a student feature ``s`` is bounded below by ``H(t) + E[log q(t | s)]``; with a Gaussian
``q(t | s) = N(mu(s), sigma^2)`` whose mean is a regressor of the student's feature and whose
variance is a learned per-channel parameter, maximising the bound is minimising the Gaussian
negative log-likelihood (up to a constant)

    ``sum_{c,h,w} log sigma_c + (t_{c,h,w} - mu_{c,h,w}(s))^2 / (2 sigma_c^2)``,

with ``sigma_c^2 = softplus(alpha_c) + eps`` so that it stays positive. For a fixed error the
term is smallest at ``sigma_c^2`` = the mean squared error of channel c.

As the authors' code (ssahn0215/variational-information-distillation) by way of RepDistiller
(``distiller_zoo/VID.py``, the CRD benchmark, weight 1): per pair the regressor is
``conv1x1 - ReLU - conv1x1 - ReLU - conv1x1`` without biases, from the student's channels through
the teacher's channel count (RepDistiller's ``VIDLoss(s, t, t)``) to the teacher's channels; the
variance starts at ``init_pred_var`` (5.0, eps 1e-5); the loss is the *mean* over batch, channels
and positions of ``0.5 * ((mu - t)^2 / var + log var)``, summed over the pairs; maps of different
resolutions are matched by average-pooling the larger one to the smaller (before the regressor,
``kd.losses.common.match_spatial``). The regressors and variances are built in ``setup`` from the
features' shapes and train with the student; the NLL is computed in fp32. A ``(B, C)`` embedding
is treated as a ``1 x 1`` map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_pairs, check_positive
from kd.losses.common import as_map, feature, match_spatial
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def gaussian_nll(mean: Tensor, target: Tensor, var: Tensor) -> Tensor:
    """``mean(0.5 * ((mean - target)^2 / var + log var))``, the NLL without its constant.

    Args:
        mean: ``(B, C, H, W)`` predicted means.
        target: ``(B, C, H, W)`` teacher features.
        var: ``(C,)`` per-channel variances, > 0.

    Returns:
        A scalar tensor in fp32 (or fp64 for fp64 input).
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)
    var = var.to(dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
    err2 = (mean.to(dtype) - target.to(dtype)).pow(2)  # (B, C, H, W)
    return (0.5 * (err2 / var + torch.log(var))).mean()


def vid_regressor(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """The mean regressor ``conv1x1 - ReLU - conv1x1 - ReLU - conv1x1`` (no biases)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, kernel_size=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(c_mid, c_mid, kernel_size=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(c_mid, c_out, kernel_size=1, bias=False),
    )


class VIDPair(nn.Module):
    """The variational distribution ``q(t | s)`` of one pair: a mean regressor and variances.

    Args:
        c_s: Student channels.
        c_t: Teacher channels (also the regressor's hidden width, as RepDistiller).
        init_pred_var: Initial variance of every channel, > eps.
        eps: Floor added to ``softplus(log_scale)``.
    """

    def __init__(self, c_s: int, c_t: int, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = vid_regressor(c_s, c_t, c_t)
        # softplus^-1(init_pred_var - eps), so that the variance starts at init_pred_var
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def variance(self) -> Tensor:
        """``softplus(log_scale) + eps``, ``(C_t,)``."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, f_s: Tensor, f_t: Tensor) -> Tensor:
        """The pair's NLL term.

        Args:
            f_s: ``(B, C_s, H_s, W_s)`` student map.
            f_t: ``(B, C_t, H_t, W_t)`` teacher map; the larger is pooled to the smaller.
        """
        f_s, f_t = match_spatial(f_s, f_t.detach())
        return gaussian_nll(self.regressor(f_s), f_t, self.variance())


class VIDLoss(DistillationLoss):
    """VID: ``ce_weight * CE + weight * sum_pairs mean NLL(t | mu(s), sigma^2)``.

    Args:
        student_nodes: Student features, one per pair (the CRD recipe: the stages' outputs).
        teacher_nodes: Teacher features, as many as ``student_nodes``.
        init_pred_var: Initial variance, > eps (5.0 in the authors' code).
        eps: Variance floor, > 0 (1e-5 in the authors' code).
        weight: Weight of the VID term (a number or a schedule); 1 in the CRD recipe.
        ce_weight: Weight of the hard-label cross-entropy.

    Attributes:
        pairs: After ``setup``, one ``VIDPair`` (regressor and ``log_scale``) per node pair.

    Raises:
        ConfigError: On unequal or empty node lists, ``eps <= 0``, ``init_pred_var <= eps`` or a
            negative weight.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        weight: float | Schedule = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        self.eps = check_positive("eps", eps)
        self.init_pred_var = check_positive("init_pred_var", init_pred_var)
        if self.init_pred_var <= self.eps:
            raise ConfigError("init_pred_var", f"must be > eps ({self.eps:g}), got {self.init_pred_var:g}")
        self.pairs: nn.ModuleList | None = None

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds each pair's regressor (student -> teacher channels) and variances.

        Raises:
            ConfigError: When a feature is neither ``(B, C)`` nor ``(B, C, H, W)``.
        """
        assert teacher is not None, "VIDLoss needs the teacher's output"
        pairs = []
        for s, t in zip(self.student_nodes, self.teacher_nodes):
            f_s = as_map(feature(student, s, "student_nodes"))
            f_t = as_map(feature(teacher, t, "teacher_nodes"))
            pairs.append(VIDPair(f_s.shape[1], f_t.shape[1], self.init_pred_var, self.eps).to(f_s.device))
        self.pairs = nn.ModuleList(pairs)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "VIDLoss needs the teacher's output"
        if self.pairs is None:
            raise RuntimeError("VIDLoss.setup must run before the loss (it builds the regressors)")
        loss = sum(
            pair(as_map(student.features[s]), as_map(teacher.features[t]))
            for s, t, pair in zip(self.student_nodes, self.teacher_nodes, self.pairs)
        )
        return {"vid": loss}

    def extra_repr(self) -> str:
        return f"init_pred_var={self.init_pred_var:g}, eps={self.eps:g}, {super().extra_repr()}"
