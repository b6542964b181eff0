"""What kd needs of a datamodule, declared: ``DataModule`` and the optional abilities methods use.

Any ``LightningDataModule`` with ``num_classes``, ``input_shape`` and the three dataloaders is a
kd datamodule; ``check_datamodule`` says at once, in one line, what a new one lacks. Two
abilities are optional, each a ``typing.Protocol`` checked where it is needed, never probed:

- ``IndexedData``: batches carry ``batch["index"]`` (the sample's position in the training
  split) and ``train_targets()`` gives the training labels in index order. CRD's memory bank
  needs it; ``kd.data.splits.SplitDataModule`` has it.
- ``ViewData``: ``splits["train"]`` is a finite set of views (``kd.data.views``) that the teacher
  cache can store the teacher's outputs for.

Batches are dicts: ``input`` ``(B, *input_shape)``, ``target`` ``(B,)`` and, with
``IndexedData``, ``index`` ``(B,)`` and ``view`` ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from kd.errors import ConfigError


@runtime_checkable
class DataModule(Protocol):
    """A datamodule kd can train on.

    Attributes:
        num_classes: Classes of the labels; the models' heads are built for it.
        input_shape: The shape of one input, ``(C, H, W)`` or ``(D,)``; models are built for it.
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def setup(self, stage: str) -> None: ...

    def train_dataloader(self) -> Any: ...

    def val_dataloader(self) -> Any: ...

    def test_dataloader(self) -> Any: ...


@runtime_checkable
class IndexedData(Protocol):
    """A datamodule whose batches carry each sample's index in the training split.

    Attributes:
        provides_index: True when ``batch["index"]`` is given (a subclass may turn it off).
    """

    provides_index: bool

    def train_targets(self) -> Tensor:
        """The labels of the training split in index order, ``(N,)``."""
        ...


@runtime_checkable
class ViewData(Protocol):
    """A datamodule whose splits (after ``setup("fit")``) are datasets, ``splits["train"]`` a set of views."""

    splits: Mapping[str, Any]


MEMBERS = ("num_classes", "input_shape", "setup", "train_dataloader", "val_dataloader", "test_dataloader")


def check_datamodule(datamodule: Any, key: str = "data") -> DataModule:
    """Refuses an object that is not a kd datamodule, naming what it lacks.

    Raises:
        ConfigError: ``data: MyData lacks num_classes, input_shape; a kd datamodule has ...``.
    """
    missing = [m for m in MEMBERS if not hasattr(datamodule, m)]
    if missing:
        raise ConfigError(key, f"{type(datamodule).__name__} lacks {', '.join(missing)}; a kd datamodule has "
                          f"{', '.join(MEMBERS)} (see kd.data.protocol and docs/writing-a-datamodule.md)")
    shape = datamodule.input_shape
    if not (isinstance(shape, (tuple, list)) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ConfigError(key, f"{type(datamodule).__name__}.input_shape must be a tuple of positive ints, got {shape!r}")
    classes = datamodule.num_classes
    if not (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 2):
        raise ConfigError(key, f"{type(datamodule).__name__}.num_classes must be an int >= 2, got {classes!r}")
    return datamodule


def provides_index(datamodule: Any) -> bool:
    """Whether the datamodule is ``IndexedData`` with ``provides_index`` on."""
    return isinstance(datamodule, IndexedData) and bool(datamodule.provides_index)
