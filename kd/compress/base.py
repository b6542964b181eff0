"""The contract between ``run(cfg)`` and the compression callbacks (pruning, QAT).

A compression callback is a Lightning ``Callback`` that changes the student while it trains,
with the teacher distilling into it throughout. Besides Lightning's hooks it has four parts that
a run calls, in this order:

1. ``preflight(trainer, student, ...)``: right after the trainer is built, before any teacher or
   student trains. The base class refuses what no compression can run with (no epochs, several
   devices, early stopping, a callback that replaces parameters beside another one), then calls
   the subclass's ``check``: every bad value (a sparsity of 1.2, a start epoch beyond
   ``max_epochs``, a student whose layers the method cannot handle) is a one-line
   ``ConfigError`` there. ``check_resume`` refuses a checkpoint the callback cannot continue from.
2. Lightning's hooks during ``trainer.fit``. The callback snapshots the dense student just before
   it first changes it (``take_dense_snapshot``), for the compression report.
3. Checkpoint selection: from ``final_epoch`` on, the student has its final form (target
   sparsity, fake quantization, channels removed); the best-validation checkpoint is chosen among
   those epochs only (``reset_selection``), so the reported student is the compressed one and
   its checkpoint loads into the final module.
4. ``finalize(student)``, after ``fit`` has loaded the selected weights: masks made permanent,
   the fake-quantized model converted to int8. It returns the deployable model.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn

from kd.errors import ConfigError


class Compression(L.Callback):
    """Base class of kd's compression callbacks.

    Attributes:
        key: The config key of this callback (``callbacks.prune``), for error messages; ``run``
            sets it after construction (constructor errors name the bare argument, which
            ``instantiate_checked`` places under the callback's key).
        order: Finalization order: pruning (0) before quantization (10).
        changes_parameters: True when the callback replaces parameter tensors (structured
            pruning removes channels), so other compression must start only after it is done.
        changes_structure: True when it replaces the student's modules or parameter shapes
            (QAT, structured pruning): a checkpoint written after ``start_epoch`` cannot be
            loaded into a fresh student, so such a run does not resume past that point.
        dense: A copy of the student taken just before this callback first changed it, in eval
            mode, or None when it has not changed it yet.
        dense_epoch: The epoch during (or at whose start) ``dense`` was taken.
        dense_step: The optimizer steps taken by then.
    """

    key: str = ""
    order: int = 0
    changes_parameters: bool = False
    changes_structure: bool = False  # replaces the student's modules or tensors: not resumable after start_epoch

    def __init__(self) -> None:
        super().__init__()
        self.dense: nn.Module | None = None
        self.dense_epoch: int | None = None
        self.dense_step: int | None = None
        self._dense_taken_at = 0.0
        self._pending_dense: dict[str, Any] | None = None

    # --- what a run calls -------------------------------------------------------------------

    def preflight(
        self, trainer: L.Trainer, student: nn.Module, *, reads_features: bool, input_shape: tuple[int, ...]
    ) -> None:
        """Refuses, before anything trains, a trainer or student this callback cannot work with.

        Args:
            trainer: The run's trainer, holding this callback among its callbacks.
            student: The student as built from its config (not yet trained).
            reads_features: Whether the distillation method reads intermediate features of the
                student (FitNet, CRD, ...), not only its logits.
            input_shape: Shape of one input ``(C, H, W)``.

        Raises:
            ConfigError: Without epochs to schedule by, on several devices, beside early stopping
                (which could end training before the student has its final form), beside another
                compression when one of them replaces the student's parameters; then whatever
                ``check`` refuses.
        """
        name = self.key or type(self).__name__
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ConfigError("trainer.max_epochs", f"is {max_epochs}; {name} schedules by epoch: set it to >= 1")
        if trainer.world_size > 1:
            raise ConfigError("trainer.devices", f"{name} runs on one device (got {trainer.world_size} processes): "
                              "set trainer.devices=1")
        if any(isinstance(cb, EarlyStopping) for cb in trainer.callbacks):  # type: ignore[attr-defined]
            raise ConfigError("callbacks", f"early stopping could end training before {name} finishes; drop it "
                              "(callbacks=[default,...]): checkpoints are selected on val among compressed epochs")
        others = [c for c in compressions(trainer.callbacks) if c is not self]  # type: ignore[attr-defined]
        replacing = [c for c in (self, *others) if c.changes_parameters]
        if others and replacing:
            other = next(c for c in (self, *others) if c is not replacing[0])
            raise ConfigError(
                other.key or type(other).__name__, f"cannot run with {replacing[0].key or type(replacing[0]).__name__}, "
                "which replaces the student's parameters; structured pruning combines with nothing else yet (run it alone)"
            )
        self.check(student, max_epochs=int(max_epochs), reads_features=reads_features, input_shape=input_shape)

    def check_resume(self, path: str, epoch: int) -> None:
        """Refuses to resume from a checkpoint written in ``epoch`` after the student's structure changed.

        Raises:
            ConfigError: On ``resume``, for a callback that replaces the student's modules or
                tensors (``changes_structure``) when ``epoch >= start_epoch``.
        """
        if self.changes_structure and epoch >= self.start_epoch:
            raise ConfigError("resume", f"{path} was written in epoch {epoch}, after {self.key or type(self).__name__} "
                              f"changed the student's structure (from epoch {self.start_epoch}); kd cannot resume such "
                              "a run yet: start it again (resume=null), or resume from a checkpoint of an earlier epoch")

    def check(
        self, student: nn.Module, *, max_epochs: int, reads_features: bool, input_shape: tuple[int, ...]
    ) -> None:
        """Refuses, before anything trains, what this callback cannot do (a subclass's own checks).

        Args:
            student: The student as built from its config (not yet trained).
            max_epochs: ``trainer.max_epochs``.
            reads_features: Whether the distillation method reads intermediate features of the
                student (FitNet, CRD, ...), not only its logits.
            input_shape: Shape of one input ``(C, H, W)``.

        Raises:
            ConfigError: Naming ``self.key`` and what to change.
        """

    @property
    def start_epoch(self) -> int:
        """The first epoch in which the callback changes the student."""
        raise NotImplementedError

    @property
    def final_epoch(self) -> int:
        """The first epoch at whose end the student has its final compressed form."""
        raise NotImplementedError

    def finalize(self, student: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """The deployable student from the trained (selected) one, in eval mode, on the CPU.

        Args:
            student: The student after training, holding the selected weights (possibly already
                finalized by a callback of lower ``order``).
            input_shape: Shape of one input ``(C, H, W)``.
        """
        return student

    def summary(self) -> dict[str, Any]:
        """What the callback did, for ``results.json`` (its settings and measured outcome)."""
        return {"callback": type(self).__name__}

    # --- helpers for subclasses ---------------------------------------------------------------

    def at(self, arg: str) -> str:
        """The config key of one of this callback's arguments, for a ConfigError."""
        return f"{self.key}.{arg}" if self.key else arg

    def take_dense_snapshot(self, trainer: L.Trainer, student: nn.Module) -> None:
        """Keeps a copy of the student before this callback first changes it (once)."""
        if self.dense is None:
            self.dense = copy.deepcopy(student).eval()
            self.dense_epoch = int(trainer.current_epoch)
            self.dense_step = int(trainer.global_step)
            self._dense_taken_at = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.final_epoch:
            reset_selection(trainer)

    # --- checkpoints: the dense snapshot travels with them, for the report of a resumed run ----

    def state_dict(self) -> dict[str, Any]:
        if self.dense is None and self._pending_dense is None:
            return {}
        weights = self._pending_dense if self.dense is None else {
            k: v.detach().cpu().clone() for k, v in self.dense.state_dict().items()}
        return {"dense": weights, "dense_epoch": self.dense_epoch, "dense_step": self.dense_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "dense" in state_dict:
            self._pending_dense = dict(state_dict["dense"])
            self.dense_epoch, self.dense_step = state_dict["dense_epoch"], state_dict["dense_step"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending_dense is not None:  # restored from a checkpoint: the student as it was before
            self.dense = copy.deepcopy(pl_module.student).eval()  # type: ignore[arg-type]
            self.dense.load_state_dict(self._pending_dense)
            self._pending_dense = None


def reset_selection(trainer: L.Trainer) -> None:
    """Makes checkpoint selection and early stopping forget the epochs before this one.

    The checkpoints already written stay on disk; they are no longer candidates for the
    best-validation student.
    """
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, ModelCheckpoint) and cb.monitor:
            cb.best_k_models = {}
            cb.kth_best_model_path = ""
            cb.best_model_score = None
            cb.best_model_path = ""
            cb.kth_value = torch.tensor(torch.inf if cb.mode == "min" else -torch.inf)
        elif isinstance(cb, EarlyStopping):
            cb.wait_count = 0
            cb.best_score = torch.tensor(torch.inf if cb.mode == "min" else -torch.inf)


def compressions(callbacks: Sequence[L.Callback]) -> list[Compression]:
    """The compression callbacks among ``callbacks``, in finalization order."""
    return sorted((c for c in callbacks if isinstance(c, Compression)), key=lambda c: c.order)


def dense_snapshot(callbacks: Sequence[Compression]) -> tuple[nn.Module | None, int | None, int | None]:
    """The earliest dense snapshot any compression callback took, with its epoch and step.

    Two callbacks starting in one epoch both snapshot; the one taken first saw the student
    before the other changed it.
    """
    taken = [c for c in callbacks if c.dense is not None and c.dense_epoch is not None]
    if not taken:
        return None, None, None
    first = min(taken, key=lambda c: (c.dense_step, c._dense_taken_at))  # noqa: SLF001
    return first.dense, first.dense_epoch, first.dense_step
