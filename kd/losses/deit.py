"""DeiT: distillation through a distillation token.

Touvron et al., "Training data-efficient image transformers & distillation through attention",
ICML 2021, arXiv:2012.12877, section 4. The student (``kd.models.vit.DistilledViT``, or timm's
``deit_*_distilled_*``) has two heads: ``head`` on the class token learns the labels, ``head_dist``
on the distillation token learns the teacher (a CNN in the paper); at inference their average is
the prediction. As the authors' code computes it (facebookresearch/deit ``losses.py``,
``DistillationLoss``):

- ``hard`` (the paper's best): ``(1 - alpha) * CE(head, y) + alpha * CE(head_dist, argmax teacher)``;
- ``soft``: ``(1 - alpha) * CE(head, y) + alpha * T^2 * KL(softmax(t / T) || softmax(head_dist / T))``,
  the KL summed and divided by the number of logits (batch x classes), not by the batch.

Their defaults: alpha 0.5, T 1 (``main.py``); the teacher RegNetY-16GF. The paper's base
criterion is label-smoothed (0.1) under mixup/cutmix; ``label_smoothing`` smooths the class head's
cross-entropy here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss, check_positive, check_weight
from kd.outputs import Batch, ModelOutput

KINDS = ("hard", "soft")


class DeiTLoss(DistillationLoss):
    """DeiT's distillation (module docstring). Terms: ``cls`` (the class head) and ``dist`` (the distillation head).

    Args:
        kind: ``hard`` or ``soft``.
        alpha: Share of the distillation term, in [0, 1].
        temperature: T > 0 of ``soft``.
        label_smoothing: Of the class head's cross-entropy, in [0, 1).
        cls_node: The student's class head (module name).
        dist_node: The student's distillation head.

    Raises:
        ConfigError: On an unknown kind or a value out of range.
    """

    def __init__(self, kind: str = "hard", alpha: float = 0.5, temperature: float = 1.0, label_smoothing: float = 0.0,
                 cls_node: str = "head", dist_node: str = "head_dist") -> None:
        super().__init__(student_nodes=[cls_node, dist_node])
        if kind not in KINDS:
            raise ConfigError("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        self.alpha = check_weight("alpha", alpha, 0.0, 1.0)
        self.temperature = check_positive("temperature", temperature)
        self.label_smoothing = check_weight("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.cls_node, self.dist_node = cls_node, dist_node

    def loss_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, Tensor]:
        assert teacher is not None
        cls = student.features[self.cls_node].float()  # (B, C)
        dist = student.features[self.dist_node].float()  # (B, C)
        t = teacher.logits.detach().float()
        if self.kind == "hard":
            kd = F.cross_entropy(dist, t.argmax(dim=1))
        else:
            temp = self.temperature
            kd = F.kl_div(F.log_softmax(dist / temp, dim=1), F.log_softmax(t / temp, dim=1), reduction="sum",
                          log_target=True) * temp * temp / dist.numel()
        return {"cls": (1 - self.alpha) * F.cross_entropy(cls, batch["target"], label_smoothing=self.label_smoothing),
                "dist": self.alpha * kd}

    def extra_repr(self) -> str:
        return f"kind={self.kind}, alpha={self.alpha:g}, temperature={self.temperature:g}, {super().extra_repr()}"
