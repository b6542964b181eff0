"""The typed output every model yields to the distillation losses."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutput:
    """What a teacher or a student produced for one batch.

    Attributes:
        logits: Class scores, shape ``(B, num_classes)``.
        features: Named intermediate activations a method asked for (empty for logit methods).
    """

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


Batch = dict[str, Tensor]
"""A batch as every datamodule yields it: ``input`` (B, ...), ``target`` (B,), ``index`` (B,)."""
