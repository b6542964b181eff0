"""Structured channel pruning: whole filters and units are removed, so the student really gets
smaller and faster (unstructured pruning only zeroes weights inside dense tensors).

Which channels can go together is found by Torch-Pruning's dependency graph (Fang, Ma, Song, Mi,
Wang, "DepGraph: Towards Any Structural Pruning", CVPR 2023, arXiv:2301.12900): the output
channels of a conv, its BatchNorm, the input channels of every consumer and every layer tied to
them by a residual addition or a concatenation form one group, pruned as one. A group's channels
are ranked by the L1 or L2 norm of their weights over the whole group (the filter-norm criterion
of Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017,
arXiv:1608.08710, extended to coupled layers), and the lowest ``amount`` of each group removed.

Pruning runs at the start of ``steps`` consecutive epochs, each step reaching a larger share of
``amount`` (``amount * k / steps`` after step k); the student trains on between steps. The
optimizer is kept, not rebuilt, so the LR schedule continues where it was: its parameter lists
are pointed at the new, smaller parameters, and their optimizer state (momentum, Adam moments) is
sliced to the kept channels.

Limits: one device only (DDP's gradient buckets are built for the dense shapes); models whose
channels Torch-Pruning cannot follow are refused before training (the CIFAR zoo's ShuffleNetV1
fails to prune, ShuffleNetV2's graph never completes); checkpoints written after pruning hold the
pruned shapes, so a run cannot resume from them into the dense student.
"""

from __future__ import annotations

import copy
import difflib
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.optim import Optimizer

from kd.compress.base import Compression
from kd.errors import ConfigError, check_int

log = logging.getLogger(__name__)

# The dependency graph of some models (ShuffleNetV2's channel split + shuffle) never finishes.
CHECK_TIME_LIMIT_S = 120


class ChannelPruning(Compression):
    """Removes the least important ``amount`` of channels of each prunable layer group.

    Args:
        amount: Fraction of the channels removed from each group (of all channels with
            ``global_pruning``), in ``[0, 1)``.
        start_epoch: The epoch at whose start the first pruning step runs.
        steps: Pruning steps, one at the start of each of ``steps`` consecutive epochs.
        importance: ``"l1"`` or ``"l2"``: the norm of a channel's weights over its group.
        global_pruning: Rank all groups' channels together, so layers lose different shares.
        round_to: Keep channel counts multiples of this (8 suits SIMD kernels), or None.
        ignored: Names of modules never pruned; the classifier always is.

    Raises:
        ConfigError: On a value out of range.

    Example:
        >>> prune = ChannelPruning(amount=0.5, start_epoch=10, steps=5)
        >>> prune.check(student, max_epochs=100, reads_features=False, input_shape=(3, 32, 32))
        >>> L.Trainer(callbacks=[prune], max_epochs=100).fit(module, datamodule)
    """

    order = 0
    changes_parameters = True
    changes_structure = True

    def __init__(
        self,
        amount: float = 0.5,
        start_epoch: int = 0,
        steps: int = 1,
        importance: str = "l2",
        global_pruning: bool = False,
        round_to: int | None = None,
        ignored: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
            raise ConfigError(self.at("amount"), f"must be a fraction in [0, 1), got {amount!r}")
        self._start_epoch = check_int(self.at("start_epoch"), start_epoch, low=0, valid=">= 0")
        self.steps = check_int(self.at("steps"), steps, low=1, valid=">= 1")
        if importance not in ("l1", "l2"):
            raise ConfigError(self.at("importance"), f"must be l1 or l2, got {importance!r}")
        if not isinstance(global_pruning, bool):
            raise ConfigError(self.at("global_pruning"), f"must be true or false, got {global_pruning!r}")
        if round_to is not None:
            check_int(self.at("round_to"), round_to, low=1, valid=">= 1 (or null)")
        if isinstance(ignored, str) or not all(isinstance(n, str) for n in ignored):
            raise ConfigError(self.at("ignored"), f"must be a list of module names, got {ignored!r}")
        self.amount = float(amount)
        self.importance = importance
        self.global_pruning = global_pruning
        self.round_to = round_to
        self.ignored = list(ignored)
        self.input_shape: tuple[int, ...] | None = None
        self._pruner: Any = None  # tp BasePruner, built at the first pruning epoch
        self._before: dict[str, Any] = {}  # measured on the dense student
        self._after: dict[str, Any] = {}  # measured after the last step

    @property
    def _whole(self) -> str:
        """The config key of the whole callback, for errors about no single argument."""
        return self.key or "callbacks"

    @property
    def start_epoch(self) -> int:
        return self._start_epoch

    @property
    def final_epoch(self) -> int:
        return self._start_epoch + self.steps - 1

    # --- checks before training ---------------------------------------------------------------

    def check(
        self, student: nn.Module, *, max_epochs: int, reads_features: bool, input_shape: tuple[int, ...]
    ) -> None:
        """Refuses what cannot work, with a dry run of the whole pruning on a copy of the student.

        Raises:
            ConfigError: If pruning does not end before ``max_epochs``, the method reads
                features, an ``ignored`` name is no module of the student, or Torch-Pruning cannot
                prune the student (no graph, nothing prunable, a broken forward afterwards).
        """
        self.input_shape = tuple(input_shape)
        if max_epochs is not None and max_epochs >= 0 and self.final_epoch >= max_epochs:
            raise ConfigError(
                self.at("start_epoch"), f"pruning runs in epochs {self.start_epoch}..{self.final_epoch} "
                f"(start_epoch + steps - 1) but trainer.max_epochs is {max_epochs}; lower start_epoch or "
                "steps, or raise trainer.max_epochs"
            )
        if reads_features:
            raise ConfigError(
                self._whole, "structured pruning changes the student's channel counts, which the feature-based "
                "distillation method reads (its regressors are built for the dense widths); use a logit "
                "method (distill=kd, dkd, ...) or unstructured pruning"
            )
        names = [n for n, _ in student.named_modules() if n]
        for name in self.ignored:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise ConfigError(
                    self.at("ignored"), f"{type(student).__name__} has no module named {name!r}; {hint}"
                    f"modules: {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}"
                )
        self._dry_run(student)

    def _dry_run(self, student: nn.Module) -> None:
        """Prunes a copy of the student to the final ``amount`` in one step and runs it."""
        what = f"{type(student).__name__}: structured pruning is a method that cannot handle the student's layers"
        hint = "list the offending modules in ignored, or use unstructured pruning"
        model = copy.deepcopy(student).eval()
        example = self._example(model)
        dense = channel_counts(model)
        with torch.no_grad():
            num_classes = model(example).shape[-1]
        try:
            with _time_limit(CHECK_TIME_LIMIT_S):
                pruner = self._build_pruner(model, example, steps=1)
        except Exception as e:  # noqa: BLE001 - Torch-Pruning fails in many ways
            raise ConfigError(self._whole, f"Torch-Pruning cannot build the dependency graph of {what} "
                              f"({type(e).__name__}: {str(e)[:200]}); {hint}") from e
        groups = pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types)
        if next(iter(groups), None) is None:
            raise ConfigError(self._whole, f"Torch-Pruning finds nothing prunable in {what} (every conv/linear "
                              "layer is ignored or the classifier)")
        try:
            with _time_limit(CHECK_TIME_LIMIT_S):
                pruner.step()
            with torch.no_grad():
                out = model(example)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(self._whole, f"Torch-Pruning fails to prune {what} ({type(e).__name__}: "
                              f"{str(e)[:200]}); {hint}") from e
        # Torch-Pruning skips a group it would empty (a few channels with round_to or a large
        # amount) or that holds an ignored layer (a residual stage with one ignored conv)
        kept = {id(m) for m in pruner.ignored_layers}
        whole = [n for n, c in channel_counts(model).items()
                 if c == dense[n] and id(model.get_submodule(n)) not in kept]
        if whole and self.amount > 0 and not self.global_pruning:
            log.warning("%s: amount=%g with round_to=%s leaves %s at full width (pruning would leave no "
                        "channel, or they are tied to an ignored layer)", self._whole, self.amount, self.round_to,
                        ", ".join(whole))
        if tuple(out.shape) != (1, num_classes):
            raise ConfigError(self._whole, f"pruning changed the output of {what} to {tuple(out.shape)}; {hint}")

    # --- Lightning hooks ----------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.input_shape is None:  # check() was not called (a Trainer built by hand)
            shape = getattr(trainer.datamodule, "input_shape", None)
            self.input_shape = tuple(shape) if shape is not None else None
        if stage == "fit" and trainer.world_size > 1:
            raise ConfigError(self._whole, "structured pruning replaces parameters, which DDP's gradient buckets "
                              "cannot follow; train on one device (trainer.devices=1)")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        epoch = trainer.current_epoch
        if not self.start_epoch <= epoch <= self.final_epoch:
            return
        student: nn.Module = pl_module.student  # type: ignore[assignment]
        if self._pruner is None:
            self.take_dense_snapshot(trainer, student)
            self._pruner = self._build_pruner(student, self._example(student), steps=self.steps)
            self._before = self._measure(student)
        while self._pruner.current_step < epoch - self.start_epoch + 1:
            prune_step(self._pruner, student, trainer.optimizers)
        pl_module.student_features.sync()  # type: ignore[operator]
        if epoch == self.final_epoch:
            self._after = self._measure(student)

    # --- after training -----------------------------------------------------------------------

    def finalize(self, student: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """The student as trained: its channels are already gone, nothing is left to do."""
        return student.eval().cpu()

    def summary(self) -> dict[str, Any]:
        """Settings; parameters, MACs and channels per pruned layer before and after."""
        out: dict[str, Any] = {
            "callback": type(self).__name__, "amount": self.amount, "start_epoch": self.start_epoch,
            "steps": self.steps, "importance": self.importance, "global_pruning": self.global_pruning,
            "round_to": self.round_to, "ignored": self.ignored, "steps_done": getattr(self._pruner, "current_step", 0),
        }
        if self._before and self._after:
            for key in ("params", "macs"):
                out[f"{key}_before"], out[f"{key}_after"] = self._before[key], self._after[key]
            before, after = self._before["channels"], self._after["channels"]
            out["channels"] = {n: [before[n], after[n]] for n in before if n in after and before[n] != after[n]}
        return out

    # --- helpers ------------------------------------------------------------------------------

    def _example(self, model: nn.Module) -> Tensor:
        if self.input_shape is None:
            raise RuntimeError("ChannelPruning needs the input shape: call check(...) before training")
        device = next(model.parameters()).device
        return torch.randn(1, *self.input_shape, device=device)  # (1, C, H, W)

    def _build_pruner(self, model: nn.Module, example: Tensor, steps: int) -> Any:
        """Torch-Pruning's pruner on ``model``, traced in eval mode (BN statistics stay untouched)."""
        was_training = model.training
        model.eval()
        try:
            ignored = [model.get_submodule(n) for n in self.ignored]
            ignored.append(classifier(model, example))
            with torch.enable_grad():  # the graph is read from autograd's
                return tp.pruner.BasePruner(
                    model, example, importance=tp.importance.GroupMagnitudeImportance(p=1 if self.importance == "l1" else 2),
                    global_pruning=self.global_pruning, pruning_ratio=self.amount, iterative_steps=steps,
                    ignored_layers=ignored, round_to=self.round_to,
                )
        finally:
            model.train(was_training)

    def _measure(self, model: nn.Module) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                macs, params = tp.utils.count_ops_and_params(model, self._example(model))
        finally:
            model.train(was_training)
        return {"params": int(params), "macs": int(macs), "channels": channel_counts(model)}


def classifier(model: nn.Module, example: Tensor) -> nn.Module:
    """The layer producing the logits: the last Linear/Conv run whose width is the number of
    classes, else the last Linear run."""
    ran: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(m)) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            num_classes = model(example).shape[-1]
    finally:
        for h in hooks:
            h.remove()
    for m in reversed(ran):
        if getattr(m, "out_features", getattr(m, "out_channels", None)) == num_classes:
            return m
    linear = [m for m in ran if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"no layer of {type(model).__name__} produces its {num_classes} logits")
    return linear[-1]


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by module name."""
    return {n: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}


def prune_step(pruner: Any, model: nn.Module, optimizers: Sequence[Optimizer]) -> None:
    """One step of ``pruner`` on ``model``; ``optimizers`` then hold the new, smaller parameters.

    Torch-Pruning replaces each pruned parameter by a new one, and carries its ``.grad`` over with
    the same index selection. Setting every gradient to the flat index of its element before the
    step therefore tells, after it, which elements each new parameter kept; the optimizer state
    (momentum, Adam moments) is sliced with them. A parameter too large for exact float indices
    (over 2**24 elements in float32) restarts its optimizer state instead.
    """
    slots = list(_slots(model))
    grads = {id(p): p.grad for _, _, p in slots}
    for _, _, p in slots:
        exact = p.is_floating_point() and p.numel() <= 2 / torch.finfo(p.dtype).eps
        p.grad = torch.arange(p.numel(), dtype=p.dtype, device=p.device).view_as(p) if exact else None
    pruner.step()
    replaced: dict[nn.Parameter, tuple[nn.Parameter, Tensor | None]] = {}
    for module, name, old in slots:
        new = module._parameters[name]
        if new is old:
            old.grad = grads[id(old)]
            continue
        assert new is not None
        index = new.grad.long().flatten() if new.grad is not None and new.grad.shape == new.shape else None
        grad = grads[id(old)]
        new.grad = grad.flatten()[index].view_as(new) if grad is not None and index is not None else None
        new.requires_grad_(old.requires_grad)  # a new Parameter would require grad, frozen or not
        replaced[old] = (new, index)
    for optimizer in optimizers:
        _follow(optimizer, replaced)


def _slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                yield module, name, p


def _follow(optimizer: Optimizer, replaced: dict[nn.Parameter, tuple[nn.Parameter, Tensor | None]]) -> None:
    """Points ``optimizer`` at the new parameters, its state sliced to the kept elements."""
    for group in optimizer.param_groups:
        group["params"] = [replaced[p][0] if p in replaced else p for p in group["params"]]
    for old, (new, index) in replaced.items():
        state = optimizer.state.pop(old, None)
        if state is None or index is None:
            continue  # nothing to carry, or the state restarts
        optimizer.state[new] = {
            k: v.flatten()[index.to(v.device)].view_as(new) if torch.is_tensor(v) and v.shape == old.shape else v
            for k, v in state.items()
        }


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raises TimeoutError in the block after ``seconds`` (main thread on POSIX; else no limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, *timer)  # someone else's timer, if any, runs on
        signal.signal(signal.SIGALRM, previous)
