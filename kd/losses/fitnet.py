"""FitNets: a learned regressor maps the student's guided layer onto the teacher's hint layer.

Romero, Ballas, Kahou, Chassang, Gatta and Bengio, "FitNets: Hints for Thin Deep Nets", ICLR
2015, arXiv:1412.6550. The hint-based training loss is ``1/2 ||u_h(x) - r(v_g(x))||^2``
between the teacher's hint ``u_h`` and a convolutional regressor ``r`` applied to the student's
guided layer ``v_g``; the regressor absorbs the difference in channel counts and sizes.

As RepDistiller (``distiller_zoo/FitNet.py`` and ``models/util.py:ConvReg``, the CRD benchmark):
the loss is the mean squared error (``nn.MSELoss``) with weight 100, and the regressor is a
convolution followed by batch norm and ReLU, chosen from the two maps' sizes:

- student map twice the teacher's: 3x3 convolution, stride 2, padding 1;
- student map half the teacher's: 4x4 transposed convolution, stride 2, padding 1;
- otherwise, student map at least as large: a convolution with kernel ``(1 + H_s - H_t,
  1 + W_s - W_t)`` (1x1 for equal sizes).

kd checks both height and width (RepDistiller only the height) and refuses other ratios with a
ConfigError. A ``(B, C)`` teacher hint (a pooled embedding) gets RepDistiller's ``Regress``, a
linear layer and ReLU on the flattened student feature. The paper's stage-wise training (first
the student's lower layers and the regressor on the hint loss alone, then the whole student by
KD) is replaced by joint training on ``CE + weight * MSE``, as in the CRD benchmark. The
regressors are built in ``setup`` from the dry-run shapes and train with the student.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_pairs
from kd.losses.schedules import Schedule
from kd.outputs import Batch, DataInfo, ModelOutput


def hint_regressor(
    s_shape: Sequence[int], t_shape: Sequence[int], relu: bool = True, key: str = "student_nodes"
) -> nn.Sequential:
    """RepDistiller's hint regressor from a student feature shape to a teacher feature shape.

    Args:
        s_shape: Student feature shape, ``(B, C_s, H_s, W_s)`` or ``(B, C_s)``.
        t_shape: Teacher feature shape, ``(B, C_t, H_t, W_t)`` or ``(B, C_t)``.
        relu: End with a ReLU (for post-activation hints, which are >= 0).
        key: Config key named in errors.

    Returns:
        ``conv -> BN -> ReLU`` for a teacher map, ``Linear -> ReLU`` (on the flattened student
        feature) for a teacher embedding; its output has the teacher's shape.

    Raises:
        ConfigError: For a student embedding paired with a teacher map, features that are
            neither maps nor embeddings, or spatial sizes the regressor cannot map.
    """
    s_shape, t_shape = tuple(s_shape), tuple(t_shape)
    if len(s_shape) not in (2, 4) or len(t_shape) not in (2, 4):
        raise ConfigError(key, f"FitNet hints must be (B, C) or (B, C, H, W), got {s_shape} and {t_shape}")
    act = [nn.ReLU()] if relu else []
    if len(t_shape) == 2:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(s_shape[1:]), t_shape[1]), *act)
    if len(s_shape) == 2:
        raise ConfigError(key, f"a (B, C) student feature {s_shape} cannot regress a teacher map {t_shape}; "
                          "pair it with a teacher embedding or pick a student map")
    c_s, h_s, w_s = s_shape[1:]
    c_t, h_t, w_t = t_shape[1:]
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        conv: nn.Module = nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    elif (2 * h_s, 2 * w_s) == (h_t, w_t):
        conv = nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    elif h_s >= h_t and w_s >= w_t:
        conv = nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    else:
        raise ConfigError(
            key, f"FitNet's regressor needs a student map twice, half or at least the size of the "
            f"teacher's; got student {h_s}x{w_s} and teacher {h_t}x{w_t}: pick an earlier (larger) "
            "student layer or a later (smaller) teacher layer"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(c_t), *act)


def hint_loss(regressed: Tensor, f_t: Tensor) -> Tensor:
    """Mean squared error between the regressed student feature and the teacher hint, in fp32.

    Args:
        regressed: ``(B, ...)`` the regressor's output.
        f_t: The teacher hint, same shape (detached here).

    Returns:
        A scalar tensor.
    """
    dtype = torch.promote_types(regressed.dtype, torch.float32)
    return F.mse_loss(regressed.to(dtype), f_t.detach().to(dtype))


class FitNetLoss(DistillationLoss):
    """FitNet hints: ``ce_weight * CE + weight * sum_pairs MSE(r(student), teacher)``.

    Args:
        student_nodes: The student's guided layer(s); one per hint (the paper uses one).
        teacher_nodes: The teacher's hint layer(s), as many as ``student_nodes``.
        relu: End each regressor with a ReLU, as RepDistiller (right for post-ReLU hints; set
            False for a pre-activation hint, which can be negative).
        weight: Weight of the hint term (a number or a schedule); 100 in the CRD recipe.
        ce_weight: Weight of the hard-label cross-entropy.

    Raises:
        ConfigError: On unequal or empty node lists or a negative weight; in ``setup``, on
            shapes the regressor cannot map.
    """

    def __init__(
        self,
        student_nodes: Sequence[str],
        teacher_nodes: Sequence[str],
        relu: bool = True,
        weight: float | Schedule = 100.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__(
            ce_weight=ce_weight, weight=weight, student_nodes=student_nodes, teacher_nodes=teacher_nodes
        )
        check_pairs(self.student_nodes, self.teacher_nodes)
        if not isinstance(relu, bool):
            raise ConfigError("relu", f"must be true or false, got {relu!r}")
        self.relu = relu
        self.regressors = nn.ModuleList()  # one per pair, built in setup

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds one regressor per pair from the dry-run feature shapes.

        Raises:
            ConfigError: When a pair's shapes cannot be mapped (see ``hint_regressor``).
        """
        assert teacher is not None, "FitNetLoss needs the teacher's output"
        regressors = []
        for s, t in zip(self.student_nodes, self.teacher_nodes):
            f_s, f_t = student.features[s], teacher.features[t]
            regressors.append(hint_regressor(f_s.shape, f_t.shape, self.relu).to(f_s.device))
        self.regressors = nn.ModuleList(regressors)

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        assert teacher is not None, "FitNetLoss needs the teacher's output"
        if len(self.regressors) != len(self.student_nodes):
            raise RuntimeError("FitNetLoss.setup must run (on a dry-run output) before the loss is used")
        pairs = zip(self.regressors, self.student_nodes, self.teacher_nodes)
        loss = sum(hint_loss(r(student.features[s]), teacher.features[t]) for r, s, t in pairs)
        return {"fitnet": loss}

    def extra_repr(self) -> str:
        return f"relu={self.relu}, {super().extra_repr()}"
