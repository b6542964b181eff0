"""Unstructured magnitude pruning while distilling, as a ``Compression`` callback.

The weights of the student's convolutions and linear layers with the smallest magnitudes are set
to zero, following a sparsity schedule (``kd.compress.schedule``): automated gradual pruning
(Zhu & Gupta, "To prune, or not to prune", arXiv:1710.01878), geometric iterative rounds
(Han et al. 2015, arXiv:1506.02626; Frankle & Carbin 2019, arXiv:1803.03635) or one shot. The
ranking is global over all prunable weights (``scope="global"``) or per tensor (``"layer"``).

Masks are hard masks held by this callback: a boolean mask per parameter name, plus references
to the ``nn.Parameter`` objects themselves. ``torch.nn.utils.prune`` is not used at all: its
reparametrization (``weight_orig`` / ``weight_mask`` and a forward pre-hook) renames
``state_dict`` keys and breaks ``torch.export`` and the PT2E quantization flow that QAT runs on
the same student. Exporting keeps the parameter objects, so the references here stay valid after
the QAT callback replaces the student module. Pruned weights stay exactly zero because the
callback masks their gradients before every optimizer step (momentum and Adam's moments never
grow there; their optimizer state is zeroed when they are pruned) and masks the weights after
every step (decoupled weight decay, and any optimizer that moves a weight with a zero gradient).

Epochs and steps: ``start_epoch``/``end_epoch`` become optimizer steps with
``steps_per_epoch = ceil(num_training_batches / accumulate_grad_batches)``; pruning starts at
step ``start_epoch * steps_per_epoch`` and the target is reached at step
``end_epoch * steps_per_epoch``, the last optimizer step of epoch ``end_epoch - 1``, so the final
sparsity holds at the end of epoch ``final_epoch = end_epoch - 1`` (``start_epoch`` for one-shot
pruning, which prunes once at step ``start_epoch * steps_per_epoch``: after the last step of the
epoch before, or before the first step when it is 0). Events are applied in
``on_train_batch_end``, when ``trainer.global_step`` (already counting that batch's step)
reaches them. Before ``start_epoch`` the student stays dense; ``initial_sparsity`` applies from
there on. The callback's ``state_dict`` holds the masks by parameter name and the schedule's
position, so a Lightning checkpoint resumes them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.optim import Optimizer

from kd.compress.base import Compression
from kd.compress.schedule import agp_sparsity, iterative_sparsity, one_shot_sparsity
from kd.errors import ConfigError, check_int

# Layer types whose ``.weight`` may be pruned. Never biases, never normalization layers: their
# few parameters carry scale, and zeroing them does not save any multiply.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRUNABLE: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": _CONV,
    "linear": (nn.Linear,),
    **{cls.__name__: (cls,) for cls in (*_CONV, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)},
}
SCHEDULES = ("agp", "one_shot", "iterative")
SCOPES = ("global", "layer")


def _sparsity_value(name: str, value: Any, high: float, valid: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < high or math.isnan(value):
        raise ConfigError(name, f"must be in {valid}, got {value!r}")
    return float(value)


def _choice(name: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise ConfigError(name, f"must be one of {', '.join(options)}, got {value!r}")
    return str(value)


def keep_mask(scores: Tensor, num_pruned: int) -> Tensor:
    """A mask keeping all but the ``num_pruned`` lowest scores, ties broken by position.

    Args:
        scores: Flat scores ``(N,)``; already-pruned entries scored below every live one.
        num_pruned: How many entries to prune, in ``[0, N]``.

    Returns:
        Boolean ``(N,)``, False at the pruned entries: exactly ``num_pruned`` of them.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if num_pruned > 0:
        # a stable sort ranks equal magnitudes by index, so the same weights prune on every run
        order = torch.sort(scores, stable=True).indices  # (N,)
        keep[order[:num_pruned]] = False
    return keep


class MagnitudePruning(Compression):
    """Prunes the smallest-magnitude conv and linear weights of the student, on a schedule.

    Args:
        final_sparsity: Share of the prunable weights that are zero at the end, in ``[0, 1)``.
        initial_sparsity: Target at ``start_epoch`` (AGP's ``s_i``; the sparsity before the first
            round of iterative pruning), in ``[0, final_sparsity]``.
        schedule: ``"agp"`` (cubic, Zhu & Gupta), ``"iterative"`` (``rounds`` geometric rounds)
            or ``"one_shot"`` (everything when ``start_epoch`` begins).
        start_epoch: The epoch in which pruning starts, >= 0.
        end_epoch: AGP and iterative pruning reach ``final_sparsity`` at the end of epoch
            ``end_epoch - 1``; None means ``trainer.max_epochs``. Must be > ``start_epoch``.
            Not used by one-shot pruning.
        frequency: Optimizer steps between AGP's pruning events (``Δt``), >= 1.
        rounds: Rounds of iterative pruning, >= 1.
        scope: ``"global"``: one magnitude threshold over all prunable weights; ``"layer"``:
            every tensor pruned to the same sparsity.
        modules: Layer types whose ``.weight`` is pruned: ``conv`` (Conv1d/2d/3d), ``linear``, or
            ``torch.nn`` class names (``Conv2d``, ``ConvTranspose2d``, ``Linear``).
        exclude: Names of student modules kept dense (``head.2``), with everything inside them.

    Raises:
        ConfigError: Naming the argument, for a value out of range or an unknown choice.

    Example:
        >>> prune = MagnitudePruning(final_sparsity=0.8, schedule="agp", frequency=10)
        >>> trainer = L.Trainer(max_epochs=30, callbacks=[prune])
    """

    order = 0

    def __init__(
        self,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        schedule: str = "agp",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        frequency: int = 100,
        rounds: int = 4,
        scope: str = "global",
        modules: Sequence[str] = ("conv", "linear"),
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.final_sparsity = _sparsity_value(self.at("final_sparsity"), final_sparsity, 1.0, "[0, 1)")
        self.initial_sparsity = _sparsity_value(
            self.at("initial_sparsity"), initial_sparsity, math.nextafter(self.final_sparsity, 2.0),
            f"[0, final_sparsity={self.final_sparsity:g}]",
        )
        self.schedule = _choice(self.at("schedule"), schedule, SCHEDULES)
        self.scope = _choice(self.at("scope"), scope, SCOPES)
        self._start_epoch = check_int(self.at("start_epoch"), start_epoch, 0, valid=">= 0")
        if end_epoch is not None:
            check_int(self.at("end_epoch"), end_epoch, 1, valid=">= 1 or null (= trainer.max_epochs)")
            if self.schedule != "one_shot" and end_epoch <= start_epoch:
                raise ConfigError(
                    self.at("end_epoch"), f"is {end_epoch} but must be > start_epoch ({start_epoch}): {self.schedule} "
                    "pruning reaches final_sparsity at the end of epoch end_epoch - 1"
                )
        self.end_epoch = end_epoch
        self.frequency = check_int(self.at("frequency"), frequency, 1, valid=">= 1")
        self.rounds = check_int(self.at("rounds"), rounds, 1, valid=">= 1")
        modules = [modules] if isinstance(modules, str) else list(modules)
        if not modules:
            raise ConfigError(self.at("modules"), f"needs at least one of {', '.join(PRUNABLE)}")
        for name in modules:
            _choice(self.at("modules"), name, list(PRUNABLE))
        self.modules = modules
        self.types = tuple({t for name in modules for t in PRUNABLE[name]})
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        if not all(isinstance(e, str) and e for e in exclude):
            raise ConfigError(self.at("exclude"), f"must be a list of module names, got {exclude!r}")
        self.exclude = exclude

        self.max_epochs: int | None = None
        self.params: dict[str, nn.Parameter] = {}  # parameter name -> the Parameter itself
        self.masks: dict[str, Tensor] = {}  # parameter name -> bool mask, False where pruned
        self.sparsity_target = 0.0  # the schedule's target as last applied
        self.events = 0  # pruning events that raised the target
        self.steps_per_epoch: int | None = None
        self.student: nn.Module | None = None
        self._pending: dict[str, Tensor] | None = None  # masks from a checkpoint, not yet bound

    # --- schedule ---------------------------------------------------------------------------

    @property
    def start_epoch(self) -> int:
        return self._start_epoch

    @property
    def resolved_end_epoch(self) -> int:
        """``end_epoch``, or ``trainer.max_epochs`` when it is None."""
        if self.end_epoch is not None:
            return self.end_epoch
        if self.max_epochs is None:
            raise RuntimeError("end_epoch is null and trainer.max_epochs is not known yet (call check or fit first)")
        return self.max_epochs

    @property
    def final_epoch(self) -> int:
        return self.start_epoch if self.schedule == "one_shot" else self.resolved_end_epoch - 1

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity after ``step`` optimizer steps (0 before pruning starts)."""
        if self.steps_per_epoch is None:
            raise RuntimeError("steps per epoch are known once training starts")
        start = self.start_epoch * self.steps_per_epoch
        if step < start:
            return 0.0  # dense until pruning starts; initial_sparsity applies from start_epoch on
        if self.schedule == "one_shot":
            return one_shot_sparsity(step, self.initial_sparsity, self.final_sparsity, start)
        end = self.resolved_end_epoch * self.steps_per_epoch
        if self.schedule == "agp":
            return agp_sparsity(step, self.initial_sparsity, self.final_sparsity, start, end, self.frequency)
        return iterative_sparsity(step, self.initial_sparsity, self.final_sparsity, start, end, self.rounds)

    # --- which weights ----------------------------------------------------------------------

    def _excluded(self, name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in self.exclude)

    def prunable(self, student: nn.Module) -> dict[str, nn.Parameter]:
        """The weights this callback prunes in ``student``, by parameter name, in module order."""
        found: dict[str, nn.Parameter] = {}
        seen: set[int] = set()
        for name, module in student.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, self.types) or self._excluded(name) or not isinstance(weight, nn.Parameter):
                continue
            if id(weight) not in seen:  # a weight tied between layers is pruned once
                seen.add(id(weight))
                found[f"{name}.weight" if name else "weight"] = weight
        return found

    def attach(self, student: nn.Module) -> None:
        """Holds references to the prunable weights of ``student`` (dense masks unless restored).

        Raises:
            RuntimeError: If masks restored from a checkpoint name weights the student lacks.
        """
        self.student = student
        self.params = self.prunable(student)
        self.masks = {}
        if self._pending is not None:
            unknown = sorted(set(self._pending) - set(self.params))
            if unknown:
                raise RuntimeError(f"checkpoint holds pruning masks of weights the student lacks: {unknown[:3]}")
            self.masks = {n: m.to(self.params[n].device, torch.bool) for n, m in self._pending.items()}
            self._pending = None
        for name, p in self.params.items():
            self.masks.setdefault(name, torch.ones_like(p, dtype=torch.bool))
        self.apply_masks()

    # --- pruning ----------------------------------------------------------------------------

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Prunes the attached weights to ``sparsity``, never reviving a pruned weight.

        The live weights with the smallest magnitudes are pruned until exactly
        ``round(sparsity * N)`` are pruned: ``N`` is all prunable weights (global scope) or each
        tensor's size (layer scope). Already-pruned weights count towards that number.

        Args:
            sparsity: The target, in ``[0, 1)``.
        """
        names = list(self.params)
        scores = []
        for name in names:
            p, mask = self.params[name], self.masks[name].to(self.params[name].device)
            # pruned weights score -1, below every magnitude, so they stay first in line
            scores.append(p.detach().abs().float().masked_fill(~mask, -1.0).flatten())  # (n,)
        if self.scope == "global":
            flat = torch.cat([s.to(scores[0].device) for s in scores])  # (N,)
            pruned = int((flat < 0).sum())
            keep = keep_mask(flat, max(pruned, round(sparsity * flat.numel())))
            kept = keep.split([s.numel() for s in scores])
        else:
            kept = [keep_mask(s, max(int((s < 0).sum()), round(sparsity * s.numel()))) for s in scores]
        for name, k in zip(names, kept):
            self.masks[name] = k.to(self.params[name].device).view_as(self.params[name])
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Sets the pruned weights to zero."""
        for name, mask in self.masks.items():
            p = self.params[name]
            if mask.device != p.device:
                self.masks[name] = mask = mask.to(p.device)
            p.mul_(mask)

    @torch.no_grad()
    def _zero_optimizer_state(self, optimizers: Sequence[Optimizer]) -> None:
        # momentum buffers and Adam moments of a weight pruned just now would still move it
        for optimizer in optimizers:
            for name, p in self.params.items():
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        value.mul_(self.masks[name])

    def _maybe_prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self.sparsity_at(trainer.global_step)
        if target <= self.sparsity_target:
            return
        if self.events == 0:  # a run resumed after pruning began has no dense student to keep
            self.take_dense_snapshot(trainer, pl_module.student)
        self.prune_to(target)
        self._zero_optimizer_state(trainer.optimizers)
        self.sparsity_target = target
        self.events += 1

    # --- Lightning hooks --------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        max_epochs = trainer.max_epochs
        if self.end_epoch is None and (max_epochs is None or max_epochs < 1):
            raise ConfigError(self.at("end_epoch"), "is null (= trainer.max_epochs) but trainer.max_epochs is not set")
        self.max_epochs = max_epochs
        # before any other callback replaces the student (QAT exports it): the layer types are
        # visible only on the original modules, and the Parameter objects outlive the export
        own = {id(p) for p in pl_module.student.parameters()}
        if not self.params or self._pending is not None or any(id(p) not in own for p in self.params.values()):
            self.attach(pl_module.student)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # the dense snapshot of a resumed run
        if self._pending is not None:  # masks restored from a checkpoint after setup
            self.attach(self.student if self.student is not None else pl_module.student)
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            raise ConfigError(self.key or "callbacks", "needs a sized training dataloader (events are in steps)")
        self.steps_per_epoch = max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))
        self.apply_masks()  # moves the masks to the parameters' device
        self._maybe_prune(trainer, pl_module)  # an event at step 0 (start_epoch 0, one_shot)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        for name, mask in self.masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grad.mul_(mask)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.apply_masks()
        self._maybe_prune(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply_masks()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # never alter a checkpoint being evaluated
            self.apply_masks()

    def state_dict(self) -> dict[str, Any]:
        """The masks by parameter name (on the CPU) and the schedule's position."""
        masks = self._pending if self._pending is not None else self.masks
        return {
            **super().state_dict(),
            "masks": {n: m.detach().cpu().clone() for n, m in masks.items()},
            "sparsity_target": self.sparsity_target,
            "events": self.events,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores masks and schedule position; masks bind to the student's weights by name."""
        super().load_state_dict(state_dict)
        self.sparsity_target = float(state_dict["sparsity_target"])
        self.events = int(state_dict["events"])
        self._pending = dict(state_dict["masks"])
        if self.student is not None:
            self.attach(self.student)

    # --- what run() calls -------------------------------------------------------------------

    def check(
        self, student: nn.Module, *, max_epochs: int, reads_features: bool, input_shape: tuple[int, ...]
    ) -> None:
        """Refuses epochs beyond the run, unknown ``exclude`` names and students with nothing to prune.

        Raises:
            ConfigError: Naming ``<key>.start_epoch``, ``<key>.end_epoch``, ``<key>.exclude`` or
                ``<key>.modules``.
        """
        if self.start_epoch >= max_epochs:
            raise ConfigError(
                self.at("start_epoch"), f"is {self.start_epoch} but trainer.max_epochs is {max_epochs}; "
                f"pruning must start in a trained epoch (0 to {max_epochs - 1})"
            )
        if self.schedule != "one_shot" and self.end_epoch is not None and self.end_epoch > max_epochs:
            raise ConfigError(
                self.at("end_epoch"), f"is {self.end_epoch} but trainer.max_epochs is {max_epochs}; "
                f"set it to at most {max_epochs}, or null to end pruning with the last epoch"
            )
        self.max_epochs = max_epochs
        names = [n for n, _ in student.named_modules() if n]
        for name in self.exclude:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else f"its modules: {', '.join(names[:8])}, ..."
                raise ConfigError(self.at("exclude"), f"{name!r} is not a module of {type(student).__name__}; {hint}")
        if not self.prunable(student):
            outside = f" outside exclude={self.exclude}" if self.exclude else ""
            raise ConfigError(
                self.at("modules"), f"magnitude pruning is a method that cannot handle the student's layers: "
                f"{type(student).__name__} has no {'/'.join(self.modules)} weight{outside} to prune"
            )

    def finalize(self, student: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """The pruned student, its zeros checked; the masks are dropped (they were never in the model).

        Raises:
            RuntimeError: If a pruned weight of ``student`` is not zero (weights loaded from
                before the final sparsity was reached).
        """
        own = {id(p) for p in student.parameters()}
        by_name = dict(student.named_parameters())
        for name, mask in self.masks.items():
            p = self.params[name] if id(self.params[name]) in own else by_name.get(name)
            if p is None:
                raise RuntimeError(f"the student to finalize has no weight {name} (nor the one pruned during training)")
            self.params[name] = p
            if p.detach()[~mask.to(p.device)].any():
                raise RuntimeError(f"{name} has non-zero pruned weights: the student was not trained with these masks")
        self.masks = {}
        self.student = student
        return student.eval().cpu()

    def summary(self) -> dict[str, Any]:
        """Settings, and measured: exact zeros among the prunable weights, per layer and overall.

        ``sparsity`` is the share of zeros among the prunable weights; ``sparsity_all_parameters``
        the same zeros over all the student's parameters (biases and norm layers stay dense).
        """
        known = self.end_epoch is not None or self.max_epochs is not None
        out: dict[str, Any] = {
            **super().summary(), "schedule": self.schedule, "scope": self.scope,
            "final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
            "start_epoch": self.start_epoch,
            "end_epoch": None if self.schedule == "one_shot" or not known else self.resolved_end_epoch,
            "final_epoch": self.final_epoch if self.schedule == "one_shot" or known else None,
            **({"frequency": self.frequency} if self.schedule == "agp" else {}),
            **({"rounds": self.rounds} if self.schedule == "iterative" else {}),
            "modules": self.modules, "exclude": self.exclude, "events": self.events,
        }
        if not self.params:
            return out
        zeros = {n: int((p.detach() == 0).sum()) for n, p in self.params.items()}
        total = sum(p.numel() for p in self.params.values())
        out["pruned_weights"] = sum(zeros.values())
        out["prunable_weights"] = total
        out["sparsity"] = sum(zeros.values()) / total
        if self.student is not None:  # the pruned share of everything the student stores
            out["sparsity_all_parameters"] = out["pruned_weights"] / sum(p.numel() for p in self.student.parameters())
        out["layers"] = {n: zeros[n] / p.numel() for n, p in self.params.items()}
        return out
