"""The contract every distillation method implements."""

from __future__ import annotations

from torch import Tensor, nn

from kd.errors import ConfigError
from kd.outputs import Batch, ModelOutput


class DistillationLoss(nn.Module):
    """Base of all methods: ``(student_out, teacher_out, batch) -> {name: weighted term}``.

    The training module sums the terms and logs each as ``train/loss_<name>``. Subclasses that
    need no teacher (plain cross-entropy) set ``requires_teacher = False`` and receive
    ``teacher=None``. Any parameters a method owns (regressors, embeddings) are trained with the
    student.
    """

    requires_teacher: bool = True

    def forward(  # noqa: D102 - documented on the class
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch
    ) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


def check_weight(
    name: str, value: float, low: float = 0.0, high: float | None = None, high_open: bool = False
) -> float:
    """Checks a loss weight or hyperparameter lies in ``[low, high]`` (``[low, high)`` if ``high_open``).

    Raises:
        ConfigError: When it does not (NaN never does); the message names the valid range.
    """
    value = float(value)
    above = high is not None and (value >= high if high_open else value > high)
    if value != value or value < low or above or value == float("inf"):
        valid = f"[{low:g}, {high:g}{')' if high_open else ']'}" if high is not None else f">= {low:g}"
        raise ConfigError(name, f"must be in {valid}, got {value:g}")
    return value
