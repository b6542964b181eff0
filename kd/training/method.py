"""Connects a distillation method to its models and data before anything trains.

``prepare_method`` builds the feature extractors a method asks for (failing on a node name the
model does not have, with the names it does have), checks the data gives what the method needs
(sample indices for CRD), and lets the method build its learned parts from one dry forward pass.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import torch
from torch import nn

from kd.data.protocol import provides_index
from kd.data.views import ImageViews
from kd.errors import ConfigError
from kd.losses.base import DistillationLoss
from kd.models.features import FeatureExtractor
from kd.outputs import DataInfo, ModelOutput
from kd.teacher.ensemble import TeacherEnsemble


def data_info(datamodule: L.LightningDataModule, needs_index: bool, method: str = "the method") -> DataInfo:
    """What a method may know about the training split: its size and, when given, its labels.

    A datamodule that yields ``batch["index"]`` is ``kd.data.protocol.IndexedData``: it sets
    ``provides_index = True`` and implements ``train_targets()``, the labels of the training
    split in index order.

    Raises:
        ConfigError: If ``needs_index`` and the datamodule gives no sample indices.
    """
    provides = provides_index(datamodule)
    if needs_index and not provides:
        raise ConfigError(
            "distill", f"{method} needs the index of every training sample (batch['index']) and "
            f"the training labels, which {type(datamodule).__name__} does not provide; pick a "
            "datamodule that does (data=digits, ...) or another method"
        )
    datamodule.setup("fit")
    if provides:
        targets = torch.as_tensor(datamodule.train_targets(), dtype=torch.long)  # (N,)
        return DataInfo(int(datamodule.num_classes), len(targets), targets)
    num_samples = len(datamodule.train_dataloader().dataset)
    return DataInfo(int(datamodule.num_classes), num_samples, None)


def pair_by_class(datamodule: L.LightningDataModule, method: str = "the method") -> None:
    """Makes the training batches carry a same-class partner of each sample (``kd.data.pairs``).

    Raises:
        ConfigError: If the datamodule cannot pair its samples (not a ``SplitDataModule``).
    """
    if not hasattr(datamodule, "class_pairs"):
        raise ConfigError(
            "distill", f"{method} needs training batches that pair each sample with another of its class, "
            f"which {type(datamodule).__name__} does not provide (kd.data.splits.SplitDataModule does); "
            "pick such a datamodule (data=digits, cifar100, ...) or another method"
        )
    datamodule.class_pairs = True


def add_strong_view(datamodule: L.LightningDataModule, method: str = "the method") -> None:
    """Makes the training batches carry a strongly augmented second view of each sample (``kd.data.strong``).

    Raises:
        ConfigError: If the datamodule's training split is not images it can augment.
    """
    datamodule.setup("fit")
    splits = getattr(datamodule, "splits", None) or {}
    if not hasattr(datamodule, "strong_views") or not isinstance(splits.get("train"), ImageViews):
        raise ConfigError("distill", f"{method} trains on a strongly augmented second view of each image, which "
                          f"{type(datamodule).__name__} does not provide (the CIFAR, MNIST and ImageNet-folder "
                          "datamodules of images in memory do); pick such data, or distill.views=1")
    if getattr(datamodule, "class_pairs", False):
        raise ConfigError("distill", f"{method} cannot have both same-class partners and a strong view")
    datamodule.strong_views = True


def prepare_method(
    criterion: DistillationLoss,
    student: nn.Module,
    teacher: nn.Module | None,
    datamodule: L.LightningDataModule,
    tracer: str = "auto",
) -> tuple[FeatureExtractor, FeatureExtractor | None]:
    """Builds the method's feature extractors and learned parts; checks it fits models and data.

    The teacher may still be untrained: only its architecture matters here, so this runs
    before a teacher is trained or loaded (its weights are loaded into the same module later).

    Args:
        criterion: The method.
        student: The student network.
        teacher: The teacher network, or None for methods without a teacher.
        datamodule: The data.
        tracer: How features are collected: ``auto``, ``fx`` or ``hooks``.

    Returns:
        The student's and the teacher's feature extractors.

    Raises:
        ConfigError: On a node name a model does not have, missing sample indices, or features
            the method cannot use.
    """
    if tracer not in ("auto", "fx", "hooks"):
        raise ConfigError("features_tracer", f"must be auto, fx or hooks, got {tracer!r}")
    name = type(criterion).__name__
    shape = tuple(datamodule.input_shape)
    student_fx = FeatureExtractor(
        student, criterion.student_nodes, key="distill.student_nodes", input_shape=shape, tracer=tracer
    )
    teacher_fx = None
    if teacher is not None:  # an ensemble's extractor reads the features of one member, the logits of all
        make = teacher.extractor if isinstance(teacher, TeacherEnsemble) else partial(FeatureExtractor, teacher)
        teacher_fx = make(criterion.teacher_nodes, key="distill.teacher_nodes", input_shape=shape, tracer=tracer)
    if criterion.requires_pairs:
        pair_by_class(datamodule, name)
    if criterion.requires_strong_view:
        add_strong_view(datamodule, name)
    info = data_info(datamodule, criterion.requires_index, name)
    s_out, t_out = dry_run(student_fx, shape), (dry_run(teacher_fx, shape) if teacher_fx else None)
    if t_out is not None and t_out.logits.shape[-1] != s_out.logits.shape[-1]:
        raise ConfigError(
            "model.teacher", f"scores {t_out.logits.shape[-1]} classes but the student "
            f"{s_out.logits.shape[-1]}; distillation compares them class by class"
        )
    try:
        criterion.setup(s_out, t_out, info)
    except ConfigError as e:
        raise e.with_prefix("distill") from None
    return student_fx, teacher_fx


@torch.no_grad()
def dry_run(extractor: FeatureExtractor, input_shape: tuple[int, ...]) -> ModelOutput:
    """The extractor's output for a batch of 2 random inputs, with the model in eval mode."""
    model = extractor.model
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        return extractor(x)
    finally:
        model.train(was_training)
