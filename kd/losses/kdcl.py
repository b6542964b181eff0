"""KDCL: peers trained together, each distilled from a teacher built from all of them at every step.

Guo, Wang, Wu, Yu, Liang, Hu and Luo, "Online Knowledge Distillation via Collaborative
Learning", CVPR 2020. The student and its peers (``model.peers``) train from scratch; at each step
their logits make one soft teacher that every network learns from, besides its labels:

- ``minlogit`` (KDCL-MinLogit): each network's logits minus its logit of the true class c,
  then the smallest over networks, class by class: ``z_t^j = min_i (z_i^j - z_i^c)``. The
  teacher's true-class logit is 0, and every other class as unlikely as the most certain network
  makes it.
- ``naive`` (KDCL-Naive): on each sample, the logits of the network with the smallest
  cross-entropy.

Network i minimises ``ce_weight * CE(z_i, y) + weight * T^2 * KL(softmax(z_t / T) || softmax(z_i / T))``,
the teacher detached. The paper's variants Linear and General (weights fitted on held-out data)
and its separate augmentation of each network's input are not implemented; the published
temperature and weight could not be confirmed offline: the defaults (T = 2, weight 1) are those
of a public reimplementation of MinLogit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.errors import ConfigError
from kd.losses.base import check_positive
from kd.losses.kd import kd_loss
from kd.losses.peers import PeersLoss
from kd.losses.schedules import Schedule
from kd.outputs import Batch

ENSEMBLES = ("minlogit", "naive")


def kdcl_teacher(logits: list[Tensor], target: Tensor, ensemble: str = "minlogit") -> Tensor:
    """The ensemble teacher's logits ``(B, C)`` from the networks' ``(B, C)``, without gradient."""
    z = torch.stack([t.detach().float() for t in logits])  # (K, B, C)
    if ensemble == "minlogit":
        true = z.gather(2, target.view(1, -1, 1).expand(len(logits), -1, 1))  # (K, B, 1)
        return (z - true).min(0).values
    ce = F.cross_entropy(z.flatten(0, 1), target.repeat(len(logits)), reduction="none").view(len(logits), -1)  # (K, B)
    best = ce.argmin(0)  # (B,)
    return z[best, torch.arange(z.shape[1], device=z.device)]


class KDCLLoss(PeersLoss):
    """KDCL (module docstring). Terms: ``ce``, ``kd`` of the student; ``ce_<peer>``, ``kd_<peer>`` of each peer.

    Args:
        ensemble: ``minlogit`` or ``naive``.
        temperature: T > 0.
        weight: Weight of each network's distillation term (a number or a schedule).
        ce_weight: Weight of each network's cross-entropy.

    Raises:
        ConfigError: On an unknown ensemble, a temperature not > 0 or a negative weight.
    """

    def __init__(self, ensemble: str = "minlogit", temperature: float = 2.0, weight: float | Schedule = 1.0,
                 ce_weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        if ensemble not in ENSEMBLES:
            raise ConfigError("ensemble", f"must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}")
        self.ensemble = ensemble
        self.temperature = check_positive("temperature", temperature)

    def shared(self, logits: dict[str, Tensor], batch: Batch) -> Tensor:
        return kdcl_teacher(list(logits.values()), batch["target"], self.ensemble)

    def network_term(self, name: str, logits: dict[str, Tensor], shared: Tensor) -> Tensor:
        return kd_loss(logits[name], shared, self.temperature)

    def extra_repr(self) -> str:
        return f"ensemble={self.ensemble}, temperature={self.temperature:g}, {super().extra_repr()}"
