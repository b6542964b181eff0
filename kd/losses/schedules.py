"""Loss weights that change over training, given explicitly as objects in the method's config.

A weight in a method config is a number or one of these; the method evaluates it at the epoch
the training module passes in (0-based). DKD's and ReviewKD's 20-epoch warm-up is
``{_target_: kd.losses.schedules.LinearWarmup, value: 1.0, epochs: 20}``.
"""

from __future__ import annotations

import math

from kd.errors import ConfigError, check_int


def _check_value(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ConfigError(name, f"must be a number >= 0 and finite, got {value!r}")
    return float(value)


class Schedule:
    """A weight as a function of the 0-based epoch."""

    def __call__(self, epoch: int) -> float:  # noqa: D102
        raise NotImplementedError


class Constant(Schedule):
    """The same value at every epoch.

    Args:
        value: The weight, finite.
    """

    def __init__(self, value: float) -> None:
        self.value = _check_value("value", value)

    def __call__(self, epoch: int) -> float:
        return self.value

    def __repr__(self) -> str:
        return f"{self.value:g}"


class LinearWarmup(Schedule):
    """``value * min((epoch + 1) / epochs, 1)``: ramps up over ``epochs`` epochs, then holds.

    The ``+ 1`` reproduces mdistiller's ``min(epoch / warmup, 1)`` with its 1-based epochs, so
    epoch 0 already trains with ``value / epochs``.

    Args:
        value: The weight after the warm-up.
        epochs: Length of the ramp, >= 1.

    Raises:
        ConfigError: If ``epochs`` is not a positive integer or ``value`` is negative.
    """

    def __init__(self, value: float, epochs: int) -> None:
        self.value = _check_value("value", value)
        self.epochs = check_int("epochs", epochs, 1, valid=">= 1")

    def __call__(self, epoch: int) -> float:
        return self.value * min((epoch + 1) / self.epochs, 1.0)

    def __repr__(self) -> str:
        return f"LinearWarmup(value={self.value:g}, epochs={self.epochs})"


class StepUntil(Schedule):
    """``value`` until ``epoch`` (exclusive), ``after`` from then on (a loss switched off or on).

    Args:
        value: The weight before ``epoch``.
        epoch: First epoch with the other weight, >= 0.
        after: The weight from ``epoch`` on.
    """

    def __init__(self, value: float, epoch: int, after: float = 0.0) -> None:
        self.value = _check_value("value", value)
        self.epoch = check_int("epoch", epoch, 0, valid=">= 0")
        self.after = _check_value("after", after)

    def __call__(self, epoch: int) -> float:
        return self.value if epoch < self.epoch else self.after

    def __repr__(self) -> str:
        return f"StepUntil(value={self.value:g}, epoch={self.epoch}, after={self.after:g})"


def as_schedule(name: str, weight: float | Schedule) -> Schedule:
    """A number or a schedule as a schedule; numbers must be finite and >= 0.

    Raises:
        ConfigError: On a negative or non-finite number, or another type.
    """
    if isinstance(weight, Schedule):
        return weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(name, f"must be a number or a kd.losses.schedules object, got {weight!r}")
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(name, f"must be >= 0 and finite, got {weight:g}")
    return Constant(weight)
