"""The shape of every method that trains the student and its peers together (``model.peers``)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kd.losses.base import DistillationLoss
from kd.outputs import STUDENT, Batch, ModelOutput


class PeersLoss(DistillationLoss):
    """Every network's ``ce_weight * CE`` and ``weight *`` the method's term for it (``network_term``).

    The networks' outputs are ``student.members`` (the student's under ``student``). Terms are
    named ``ce`` and ``<term>`` for the student, ``ce_<peer>`` and ``<term>_<peer>`` for each peer.
    """

    requires_teacher = False
    trains_peers = True
    term = "kd"

    def shared(self, logits: dict[str, Tensor], batch: Batch) -> Any:
        """What every network's term uses, computed once per step (a teacher made of all networks)."""
        return None

    def network_term(self, name: str, logits: dict[str, Tensor], shared: Any) -> Tensor:
        """The method's term of network ``name``, before ``weight``."""
        raise NotImplementedError(f"{type(self).__name__} must implement network_term")

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, epoch: int = 0) -> dict[str, Tensor]:
        logits = {name: out.logits for name, out in student.members.items()}  # every network, the student first
        shared = self.shared(logits, batch)
        weight = self.weight(epoch)
        terms: dict[str, Tensor] = {}
        for name, z in logits.items():
            suffix = "" if name == STUDENT else f"_{name}"
            if self.ce_weight > 0:
                terms[f"ce{suffix}"] = self.ce_weight * F.cross_entropy(z.float(), batch["target"])
            terms[f"{self.term}{suffix}"] = weight * self.network_term(name, logits, shared)
        return terms
