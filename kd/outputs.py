"""The typed outputs and data facts passed between models, datamodules and losses."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

STUDENT = "student"
"""The student's name among the networks that train together (``ModelOutput.members`` of peers)."""


@dataclass
class ModelOutput:
    """What a teacher or a student produced for one batch.

    Attributes:
        logits: Class scores, shape ``(B, num_classes)``.
        features: Named intermediate activations a method asked for, keyed by the module or FX
            node name it gave (``layer2``, ``layer2.1.add``); empty for logit methods.
        members: The outputs this one was made of, by network name: a teacher ensemble's
            members (``kd.teacher.ensemble``), or the student's and its peers' (``STUDENT`` and
            ``model.peers``' names) for methods that train several networks; empty otherwise.
    """

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    members: dict[str, ModelOutput] = field(default_factory=dict)


Batch = dict[str, Tensor]
"""A batch as every datamodule yields it: ``input`` (B, ...), ``target`` (B,), ``index`` (B,)."""


@dataclass
class DataInfo:
    """What a method may need to know about the training data before training starts.

    Attributes:
        num_classes: Number of classes.
        num_samples: Size of the training split; ``batch["index"]`` lies in ``[0, num_samples)``.
        targets: ``(num_samples,)`` labels of the training split in index order, or None when
            the datamodule does not provide sample indices.
    """

    num_classes: int
    num_samples: int
    targets: Tensor | None = None
