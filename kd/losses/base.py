"""The contract every distillation method implements, and the stage a method may ask for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from kd.errors import ConfigError
from kd.losses.schedules import Schedule, as_schedule
from kd.outputs import Batch, DataInfo, ModelOutput


@dataclass
class Stage:
    """A preliminary training stage a method runs before distillation.

    FT trains its paraphraser on the teacher's features; AB and FSP first train the student's
    feature layers (and connectors) to imitate the teacher. kd runs every stage the same way
    (``kd.training.stages.run_stages``): ``epochs`` epochs over the training data with the run's optimizer,
    updating only ``modules`` (and the student when ``train_student``), before the main training.

    Attributes:
        name: Short name, used in logs and ``results.json``.
        epochs: Number of epochs, >= 1.
        loss: ``(student_out, teacher_out, batch) -> {name: term}``; ``student_out`` is None
            unless ``train_student``.
        modules: The method's own modules that this stage trains.
        train_student: Whether the student's parameters train in this stage too.
        freeze_after: Whether ``modules`` stop training after the stage (``requires_grad``
            off), so the main optimizer, and DDP, leave them alone.
    """

    name: str
    epochs: int
    loss: Callable[[ModelOutput | None, ModelOutput, Batch], dict[str, Tensor]]
    modules: Sequence[nn.Module] = field(default_factory=list)
    train_student: bool = False
    freeze_after: bool = False


class DistillationLoss(nn.Module):
    """Base of all methods: ``(student_out, teacher_out, batch, epoch) -> {name: weighted term}``.

    A method implements ``loss_terms`` (its own terms with its internal coefficients, such as
    DKD's alpha and beta) and, when it has learned parts whose shapes depend on the models,
    ``setup``. The base class adds the hard-label cross-entropy (``ce_weight``) and multiplies
    the method's terms by ``weight``, a number or a ``kd.losses.schedules`` object evaluated at
    the epoch. The training module sums the terms and logs each as ``train/loss_<name>``.

    Features: a method reads ``student.features[name]`` for each name in ``student_nodes`` (and
    the teacher's likewise); kd collects them with FX or forward hooks, without model edits.

    Args:
        ce_weight: Weight of the hard-label cross-entropy, >= 0 (0 leaves it out).
        weight: Weight of the method's terms, a number >= 0 or a schedule.
        student_nodes: Module or FX node names of the student whose outputs the method reads.
        teacher_nodes: The same for the teacher.

    Attributes:
        requires_teacher: False for methods that train without a teacher.
        requires_index: True for methods that need ``batch["index"]`` and ``DataInfo.targets``.
        requires_pairs: True for methods that need a same-class partner of each training sample
            (``kd.data.pairs``): the batch then carries ``pair_input``, and the training module
            adds ``pair_logits``, the student's outputs on them without gradient.
        trains_peers: True for methods that train several networks together (``model.peers``):
            ``student.members`` then holds every network's output by name, the student's
            under ``student``, and the method returns the terms of all of them.
        requires_strong_view: True for methods that train on a strongly augmented second view
            (``kd.data.strong``, MLKD's): the batch then carries ``strong_input``, and the training
            module adds ``strong_logits`` (the student's, with gradient) and ``strong_teacher_logits``.
        requires_ensemble: True for methods that weigh the teachers of an ensemble
            (``model.teachers``): ``teacher.members`` holds each teacher's output by name.
    """

    requires_teacher: bool = True
    requires_index: bool = False
    requires_pairs: bool = False
    requires_strong_view: bool = False
    trains_peers: bool = False
    requires_ensemble: bool = False

    def __init__(
        self,
        *,
        ce_weight: float = 0.0,
        weight: float | Schedule = 1.0,
        student_nodes: Sequence[str] = (),
        teacher_nodes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.weight = as_schedule("weight", weight)
        self.student_nodes = node_list("student_nodes", student_nodes)
        self.teacher_nodes = node_list("teacher_nodes", teacher_nodes)

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Builds the method's learned parts from one dry-run output of each model.

        Called once before training with outputs of a 2-sample batch (eval mode), whose feature
        shapes give the channel counts and sizes of regressors, embeddings and connectors.

        Raises:
            ConfigError: When the features cannot be used as the method needs them.
        """

    def loss_terms(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        """The method's own terms, before ``weight`` (subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss_terms")

    def stages(self) -> list[Stage]:
        """Preliminary stages to run before the main training (none by default)."""
        return []

    def forward(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, epoch: int = 0
    ) -> dict[str, Tensor]:
        """All terms, weighted: ``ce`` when ``ce_weight > 0``, then the method's.

        Args:
            student: The student's output.
            teacher: The teacher's output (None for methods without a teacher).
            batch: The batch.
            epoch: The current 0-based epoch, for scheduled weights.
        """
        terms: dict[str, Tensor] = {}
        if self.ce_weight > 0:
            terms["ce"] = self.ce_weight * F.cross_entropy(student.logits.float(), batch["target"])
        weight = self.weight(epoch)
        for name, value in self.loss_terms(student, teacher, batch).items():
            terms[name] = weight * value
        return terms

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight:g}, weight={self.weight!r}"


def check_weight(
    name: str, value: float, low: float = 0.0, high: float | None = None, high_open: bool = False
) -> float:
    """Checks a loss weight or hyperparameter lies in ``[low, high]`` (``[low, high)`` if ``high_open``).

    Raises:
        ConfigError: When it does not (NaN never does); the message names the valid range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    value = float(value)
    above = high is not None and (value >= high if high_open else value > high)
    if value != value or value < low or above or value == float("inf"):
        valid = f"in [{low:g}, {high:g}{')' if high_open else ']'}" if high is not None else f">= {low:g} and finite"
        raise ConfigError(name, f"must be {valid}, got {value:g}")
    return value


def check_positive(name: str, value: float) -> float:
    """Checks a value (a temperature, a margin) is > 0 and finite.

    Raises:
        ConfigError: When it is not.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, got {value!r}")
    value = float(value)
    if not 0 < value < float("inf"):
        raise ConfigError(name, f"must be > 0 and finite, got {value:g}")
    return value


def node_list(name: str, nodes: str | Sequence[str]) -> tuple[str, ...]:
    """Node names as a tuple (one name may be given as a string).

    Raises:
        ConfigError: If an entry is not a non-empty string.
    """
    nodes = (nodes,) if isinstance(nodes, str) else tuple(nodes)
    for n in nodes:
        if not isinstance(n, str) or not n:
            raise ConfigError(name, f"must be a list of module or node names, got {list(nodes)!r}")
    return nodes


def check_pairs(student_nodes: Sequence[str], teacher_nodes: Sequence[str], count: int | None = None) -> None:
    """Checks a method that pairs student and teacher features got as many of each.

    Args:
        student_nodes: The student's node names.
        teacher_nodes: The teacher's node names.
        count: The exact number required, or None for any number >= 1.

    Raises:
        ConfigError: On unequal or wrong counts.
    """
    if len(student_nodes) != len(teacher_nodes) or not student_nodes:
        raise ConfigError(
            "student_nodes", f"pairs with teacher_nodes, so both need the same number (>= 1) of "
            f"names; got {len(student_nodes)} and {len(teacher_nodes)}"
        )
    if count is not None and len(student_nodes) != count:
        raise ConfigError("student_nodes", f"needs exactly {count} name(s), got {list(student_nodes)}")
