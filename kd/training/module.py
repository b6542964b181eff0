"""The LightningModule of every kd run: a trainable student, an optional frozen teacher, a loss."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kd.errors import ConfigError
from kd.losses.base import DistillationLoss
from kd.models.features import FeatureExtractor
from kd.outputs import STUDENT, Batch, ModelOutput
from kd.teacher.cache import TeacherCache
from kd.teacher.ensemble import ensemble_logits
from kd.training.dot import split_task_loss
from kd.training.finite import FiniteWatch

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]


# the peers' ensemble in metric names (val/ensemble/acc)
ENSEMBLE = "ensemble"
# checkpoint key of the training metrics' state inside the epoch: a run resumed from a step
# checkpoint logs the whole epoch's accuracy and loss means, not those of the steps after the resume
EPOCH_METRICS = "kd_epoch_metrics"


def _accuracy(num_classes: int, validate: bool = True) -> MetricCollection:
    """Top-1 (and top-5) accuracy; ``validate=False`` skips torchmetrics' input checks, which read
    the targets on the host (a device synchronisation per update): for the training step."""
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=validate)}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=validate)
    return MetricCollection(metrics)


class EpochMean(MeanMetric):
    """The weighted mean of a loss term over an epoch, updated without a device synchronisation.

    torchmetrics' ``MeanMetric.update`` looks for NaN on the host and copies a Python weight to
    the device, both of which wait for the GPU; here the weight is a kernel argument and a NaN
    reaches the mean (the divergence guard, ``kd.training.finite``, reports it). Same states
    (``mean_value``: the weighted sum, ``weight``), so checkpoints of either load.
    """

    def update(self, value: Tensor, weight: float = 1.0) -> None:  # type: ignore[override]
        """Adds a 0-dim ``value`` with weight ``weight`` (a number: the batch size)."""
        self.mean_value += value.to(self.mean_value.dtype) * weight
        self.weight += weight


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: bool | str | None) -> str | None:
    """``speed.compile`` as torch.compile's mode: None (eager), ``default`` (true) or a named mode.

    Raises:
        ConfigError: For another value.
    """
    if value in (None, False, "false", "none"):
        return None
    if value is True or value == "true":
        return "default"
    if value not in COMPILE_MODES:
        raise ConfigError("speed.compile", f"must be false, true or a torch.compile mode ({', '.join(COMPILE_MODES)}), "
                          f"got {value!r}")
    return str(value)


def check_peers(criterion: DistillationLoss, peers: dict[str, nn.Module] | None) -> None:
    """Checks networks that train together (``model.peers``) go with a method that trains them.

    Raises:
        ConfigError: Peers for a one-student method, none for a method of peers, or a peer name
            that is not a plain identifier (or is ``student`` or ``ensemble``).
    """
    method = type(criterion).__name__
    if peers and not criterion.trains_peers:
        raise ConfigError("model.peers", f"names networks to train together, but {method} trains one student; "
                          "pick a method of peers (distill=dml, kdcl) or remove model.peers")
    if criterion.trains_peers and not peers:
        raise ConfigError("model.peers", f"{method} trains peers together: give at least one beside the student, "
                          "e.g. +model/student@model.peers.peer1=resnet32")
    for name in peers or {}:
        if not name.isidentifier() or name in (STUDENT, ENSEMBLE):
            raise ConfigError(f"model.peers.{name}", f"a peer's name must be an identifier other than {STUDENT} "
                              f"and {ENSEMBLE}")


def _cloned(out: ModelOutput) -> ModelOutput:
    """A copy of the logits and features (a teacher ensemble's members' too), outside inference mode."""
    return ModelOutput(out.logits.clone(), {k: v.clone() for k, v in out.features.items()},
                       {name: _cloned(m) for name, m in out.members.items()})


class DistillationModule(L.LightningModule):
    """Trains ``student`` with ``criterion``, guided by a frozen ``teacher`` when one is given.

    The teacher is frozen for real: its parameters have ``requires_grad=False``, it stays in eval
    mode whatever Lightning calls, its forward runs under ``torch.no_grad()`` (not inference
    mode, whose tensors autograd refuses to save), and it is left out of the optimizer and so of
    gradient clipping. Without a teacher this is plain supervised training: the same module
    trains teachers.

    Args:
        student: The network to train.
        criterion: The distillation method; its parameters (if any) train with the student.
        optimizer: ``partial`` of an optimizer class, called with the trainable parameters.
        num_classes: Classes of the data, for the accuracy metrics.
        teacher: The frozen teacher, or None.
        scheduler: ``partial`` of an LR scheduler class, called with the optimizer, or None.
        scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        student_features: Extractor of the features ``criterion`` reads from the student (built
            by ``kd.training.method.prepare_method``); None for logits only.
        teacher_features: The same for the teacher.
        teacher_cache: The teacher's stored outputs on every training view (``kd.teacher.cache``): read
            instead of running the teacher; batches must carry ``index`` and ``view``.
        channels_last: Keep conv weights and image batches in channels-last memory layout.
        compile: ``torch.compile`` the student's and the teacher's forward (their feature
            extractors are built first, then compiled): True, or torch.compile's mode
            (``reduce-overhead``: CUDA graphs; ``max-autotune``).
        fused_optimizer: On a GPU, the optimizer's fused kernel (``fused=True``: SGD, Adam, AdamW)
            instead of one launch per parameter group of tensors.
        peers: Networks that train with the student, by name, for methods that train several
            (``criterion.trains_peers``: DML, KDCL). One optimizer steps them all; the criterion
            gets every network's output as ``student.members`` (the student's under ``student``);
            each is evaluated alone (``val/<name>/acc``, ...) and so is their ensemble
            (``val/ensemble/acc``: the mean of their probabilities).
        finite_check_every: Steps between two host reads of the divergence guard's device-side
            record (``kd.training.finite``); it is also read before every checkpoint and at the end.

    Raises:
        ConfigError: If the criterion needs a teacher and none is given, or peers and the
            criterion disagree.
    """

    def __init__(
        self,
        student: nn.Module,
        criterion: DistillationLoss,
        optimizer: OptimizerFactory,
        num_classes: int,
        teacher: nn.Module | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
        student_features: FeatureExtractor | None = None,
        teacher_features: FeatureExtractor | None = None,
        teacher_cache: TeacherCache | None = None,
        channels_last: bool = False,
        compile: bool | str = False,
        peers: dict[str, nn.Module] | None = None,
        fused_optimizer: bool = False,
        finite_check_every: int = 16,
    ) -> None:
        super().__init__()
        if criterion.requires_teacher and teacher is None:
            raise ConfigError("distill", f"{type(criterion).__name__} needs a teacher; none given")
        check_peers(criterion, peers)
        if scheduler_interval not in ("epoch", "step"):
            raise ConfigError("scheduler_interval", f"must be epoch or step, got {scheduler_interval}")
        self.student = student
        self.criterion = criterion
        self.teacher = teacher
        self.peers = nn.ModuleDict(peers or {})
        self.peer_features = {name: FeatureExtractor(net, [], key="", input_shape=()) for name, net in self.peers.items()}
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        for name, extractor, model in (("student", student_features, student), ("teacher", teacher_features, teacher)):
            if extractor is not None and extractor.model is not model:
                raise ValueError(f"{name}_features was built for another model than the {name}")
        # Not submodules: they share the models' weights and hold none of their own.
        self.student_features = student_features or FeatureExtractor(student, [], key="", input_shape=())
        self.teacher_features = teacher_features or (
            FeatureExtractor(teacher, [], key="", input_shape=()) if teacher is not None else None
        )
        if teacher_cache is not None and teacher is None:
            raise ValueError("a teacher cache was given without a teacher")
        self.teacher_cache = teacher_cache
        self.channels_last = channels_last
        self.compile = compile_mode(compile)
        self.fused_optimizer = fused_optimizer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.finite = FiniteWatch(finite_check_every)
        acc = _accuracy(num_classes)
        self.train_metrics = _accuracy(num_classes, validate=False).clone(prefix="train/")
        # the epoch means of the loss terms ("loss", "loss_kd", ...), made at their first step
        self.train_losses = nn.ModuleDict()
        self._resumed_epoch: dict[str, Any] | None = None  # see on_load_checkpoint
        self.val_metrics = acc.clone(prefix="val/")
        self.test_metrics = acc.clone(prefix="test/")
        # each peer's and the ensemble's: val/<name>/acc, ...
        self.peer_metrics = nn.ModuleDict({
            stage: nn.ModuleDict({name: acc.clone(prefix=f"{stage}/{name}/") for name in (*self.peers, ENSEMBLE)})
            for stage in ("val", "test")
        } if self.peers else {})

    def train(self, mode: bool = True) -> DistillationModule:
        """Sets train/eval mode on everything but the teacher, which stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """The student's logits ``(B, num_classes)``."""
        return self.student(x)

    def teacher_forward(self, x: Tensor) -> ModelOutput:
        """The teacher's logits and features, computed in inference mode and always in eval mode.

        Under ``bf16-mixed`` the surrounding autocast applies. The outputs are cloned out of
        inference mode (a copy of the logits and features only), so losses may save them for
        their backward pass.
        """
        assert self.teacher is not None and self.teacher_features is not None
        if self.teacher.training:  # someone called teacher.train() directly
            self.teacher.eval()
        with torch.inference_mode():
            out = self._call(self.teacher_features, x)
        return _cloned(out)

    def teacher_outputs(self, batch: Batch, x: Tensor) -> ModelOutput:
        """The teacher's outputs on a training batch (inputs ``x``): read from the cache when there is one."""
        if self.teacher_cache is not None:
            return self.teacher_cache.lookup(batch["index"], batch["view"])
        return self.teacher_forward(x)

    def on_fit_start(self) -> None:
        if self.channels_last:
            for model in (self.student, self.teacher, *self.peers.values()):
                if model is not None:
                    model.to(memory_format=torch.channels_last)
        if self.teacher_cache is not None and self.device.type == "cuda":
            self.teacher_cache.to(self.device)

    def _input(self, batch: Batch) -> Tensor:
        x = batch["input"]  # (B, ...)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_train_start(self) -> None:
        # Lightning may have replaced submodules (sync_batchnorm): re-attach the extractors.
        self.student_features.sync()
        if self.teacher_features is not None:
            self.teacher_features.sync()
        for fx in self.peer_features.values():
            fx.sync()

    def _call(self, extractor: FeatureExtractor, x: Tensor) -> ModelOutput:
        """``extractor(x)``, compiled under ``compile``.

        The extractor is looked up at every call: callbacks (QAT, structured pruning) replace the
        student's extractor or its graph during training.
        """
        return extractor.compiled(self.compile)(x) if self.compile else extractor(x)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student, peer and criterion parameters: everything the optimizer updates, never the teacher."""
        for module in (self.student, *self.peers.values(), self.criterion):
            yield from (p for p in module.parameters() if p.requires_grad)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = self._input(batch), batch["target"]  # (B, ...), (B,)
        student = self._call(self.student_features, x)
        if self.peers:  # every network that trains, by name, for the criterion
            outs = {STUDENT: student, **{name: self._call(fx, x) for name, fx in self.peer_features.items()}}
            student = ModelOutput(student.logits, student.features, outs)
        if "pair_input" in batch:  # same-class partners (kd.data.pairs): the student's outputs, no gradient
            with torch.no_grad():
                batch["pair_logits"] = self._call(self.student_features, self._input({"input": batch["pair_input"]})).logits
        teacher = self.teacher_outputs(batch, x) if self.teacher is not None else None
        if "strong_input" in batch:  # a strongly augmented second view (kd.data.strong): both networks see it
            strong = self._input({"input": batch["strong_input"]})
            batch["strong_logits"] = self._call(self.student_features, strong).logits
            if self.teacher is not None:
                batch["strong_teacher_logits"] = self.teacher_forward(strong).logits
        terms = self.criterion(student, teacher, batch, epoch=self.current_epoch)
        loss = torch.stack(list(terms.values())).sum()
        self.finite.note(terms, loss, (self.global_step, self.current_epoch, batch_idx), self._rank_sum())
        n = len(y)
        if self._resumed_epoch is not None:
            self._restore_epoch_metrics()
        for name, value in (*((f"loss_{k}", v) for k, v in terms.items()), ("loss", loss)):
            mean = self._loss_mean(name)
            mean.update(value.detach(), n)
            self.log(f"train/{name}", mean, on_epoch=True, on_step=False, prog_bar=name == "loss",
                     batch_size=n, metric_attribute=f"train_losses.{name}")
        self.train_metrics.update(student.logits.detach(), y)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=n)
        optimizer = self._splitting_optimizer()
        if optimizer is not None:  # DOT: the distillation terms' gradient has a momentum of its own
            zero = student.logits.float().sum() * 0.0
            return split_task_loss(optimizer, terms, list(self.trainable_parameters()), zero)
        return loss

    def _splitting_optimizer(self) -> Any:
        """The run's optimizer when it takes the distillation gradient apart (``kd.training.dot``), else None."""
        if self._trainer is None:
            return None
        optimizer = self.optimizers(use_pl_optimizer=False)
        return optimizer if getattr(optimizer, "splits_gradients", False) else None

    def _rank_sum(self) -> Callable[[Tensor], Tensor] | None:
        """Sums a tensor over the ranks under DDP; None with one process."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return lambda t: trainer.strategy.reduce(t, reduce_op="sum")

    def check_finite(self) -> None:
        """Reads the divergence guard's record (``kd.training.finite``): raises ``Diverged`` after a
        non-finite loss term. Every rank calls it together (checkpoints, the end of training)."""
        self.finite.check(self._rank_sum())

    def on_train_end(self) -> None:
        self.check_finite()  # the steps since the last read: nothing is saved or tested after a NaN

    def _eval_step(self, batch: Batch, metrics: MetricCollection, stage: str) -> None:
        x, y = self._input(batch), batch["target"]
        logits = self.student(x)  # (B, num_classes)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, batch_size=len(y), sync_dist=True)
        metrics.update(logits, y)
        self.log_dict(metrics, batch_size=len(y), prog_bar=stage == "val")
        if self.peers:
            outs = {STUDENT: logits, **{name: net(x) for name, net in self.peers.items()}}
            outs[ENSEMBLE] = ensemble_logits(list(outs.values()))
            for name, peer_metrics in self.peer_metrics[stage].items():
                self.log(f"{stage}/{name}/loss", nn.functional.cross_entropy(outs[name], y), batch_size=len(y), sync_dist=True)
                peer_metrics.update(outs[name], y)
                self.log_dict(peer_metrics, batch_size=len(y))

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_train_epoch_end(self) -> None:
        optimizer = self.optimizers()
        self.log("train/lr", optimizer.param_groups[0]["lr"])  # type: ignore[union-attr]
        # how far training got, read back by kd.training.fit when ddp_spawn/ddp_fork trained in worker processes
        self.log("train/epochs", float(self.current_epoch + 1), logger=False, sync_dist=True)

    def _loss_mean(self, name: str) -> MeanMetric:
        """The epoch mean of loss term ``name``, made at its first use."""
        if name not in self.train_losses:
            self.train_losses[name] = EpochMean().to(self.device)
        return self.train_losses[name]  # type: ignore[return-value]

    def _epoch_metrics(self) -> dict[str, Metric]:
        """The metrics that add up the training epoch: accuracies and loss means, by name."""
        return {**{f"train_metrics.{k}": m for k, m in self.train_metrics.items(keep_base=True, copy_state=True)},
                **{f"train_losses.{k}": m for k, m in self.train_losses.items()}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leaves the frozen teacher out of checkpoints (it is restored from its own source) and
        saves how far the epoch's training metrics got (``EPOCH_METRICS``).

        The metrics' states are sums: those of every rank are added up here (every rank saves a
        checkpoint together) and the resumed run puts the total on rank 0.

        Raises:
            Diverged: When a loss term was non-finite since the last read of the divergence guard:
                the checkpoint would hold weights updated by it, and is not written.
        """
        self.check_finite()
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        trainer = self._trainer
        several = trainer is not None and trainer.world_size > 1
        sums = {name: {k: trainer.strategy.reduce(v.detach().clone(), reduce_op="sum") if several else v.detach().clone()
                       for k, v in metric.metric_state.items()}
                for name, metric in self._epoch_metrics().items() if metric.update_count}
        checkpoint[EPOCH_METRICS] = {"epoch": self.current_epoch, "metrics": sums}

    def _restore_epoch_metrics(self) -> None:
        """Adds the saved part of the epoch to the training metrics, at the resumed run's first step.

        Only when the run resumes inside that epoch (a step checkpoint), and on rank 0 only.
        """
        saved, self._resumed_epoch = self._resumed_epoch, None
        assert saved is not None
        if int(saved.get("epoch", -1)) != self.current_epoch or self.global_rank != 0:
            return
        for name, state in saved.get("metrics", {}).items():
            group, _, key = name.partition(".")
            if group == "train_losses":
                self._loss_mean(key)
            metric = self._epoch_metrics().get(name)
            if metric is not None:
                metric.merge_state({k: v.to(self.device) for k, v in state.items()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Puts the current teacher's weights back, so a checkpoint without them loads strictly.

        Raises:
            ConfigError: If the checkpoint holds learned parts of the method (regressors, memory
                banks) that this module's criterion does not have: they are built by
                ``kd.training.method.prepare_method``, which must run before a checkpoint is loaded.
        """
        own = {f"criterion.{k}" for k in self.criterion.state_dict()}
        extra = sorted(k for k in checkpoint["state_dict"] if k.startswith("criterion.") and k not in own)
        if extra:
            raise ConfigError(
                "checkpoint", f"holds {len(extra)} entries of the method's learned parts (e.g. {extra[0]}) "
                f"that {type(self.criterion).__name__} does not have yet; build them with "
                "kd.training.method.prepare_method(criterion, student, teacher, datamodule) before loading"
            )
        if self.teacher is not None:
            state = checkpoint["state_dict"]
            for key, value in self.teacher.state_dict().items():
                state.setdefault(f"teacher.{key}", value)
        self._resumed_epoch = checkpoint.get(EPOCH_METRICS)

    def _optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        """The optimizer, fused on a GPU under ``fused_optimizer`` when its class has a fused kernel."""
        factory = self.optimizer_factory
        cls = getattr(factory, "func", factory)
        fusable = "fused" in inspect.signature(cls).parameters and "fused" not in (getattr(factory, "keywords", None) or {})
        if self.fused_optimizer and fusable and self.device.type == "cuda":
            return factory(params, fused=True)
        return factory(params)

    def configure_optimizers(self) -> Any:
        optimizer = self._optimizer(list(self.trainable_parameters()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
