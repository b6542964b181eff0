"""Deep Mutual Learning: peers trained from scratch together, each taught by the others.

Zhang, Xiang, Hospedales and Lu, "Deep Mutual Learning", CVPR 2018, arXiv:1706.00384, eq. 10:
for K networks, network k minimises

    L_k = CE(p_k, y) + 1/(K-1) * sum_{l != k} KL(p_l || p_k),

the other networks' predictions taken as fixed targets. The paper updates the networks one after
the other within a step; kd steps all of them at once with one optimizer on the sum of every
L_k (each network's gradient comes only from its own L_k: the targets are detached), as most
reimplementations do. A temperature T (1 in the paper) softens both sides, with the T^2 of
Hinton et al. so the term's gradient keeps its size.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kd.losses.base import check_positive
from kd.losses.kd import kd_loss
from kd.losses.peers import PeersLoss
from kd.losses.schedules import Schedule


class DMLLoss(PeersLoss):
    """DML: for every network, ``ce_weight * CE + weight * mean over the others of T^2 KL(p_other || p_self)``.

    Terms: ``ce`` and ``kl`` of the student, ``ce_<peer>`` and ``kl_<peer>`` of each peer.

    Args:
        temperature: T > 0 (the paper: 1).
        weight: Weight of the mimicry terms (a number or a schedule); the paper: 1.
        ce_weight: Weight of each network's cross-entropy; the paper: 1.

    Raises:
        ConfigError: If ``temperature`` is not > 0 or a weight is negative.
    """

    term = "kl"

    def __init__(self, temperature: float = 1.0, weight: float | Schedule = 1.0, ce_weight: float = 1.0) -> None:
        super().__init__(ce_weight=ce_weight, weight=weight)
        self.temperature = check_positive("temperature", temperature)

    def network_term(self, name: str, logits: dict[str, Tensor], shared: Any) -> Tensor:
        others = [z.detach() for n, z in logits.items() if n != name]
        return sum(kd_loss(logits[name], z, self.temperature) for z in others) / len(others)  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:g}, {super().extra_repr()}"
