"""DOT, the distillation-oriented trainer: separate momenta for the task's and the distillation's gradients.

Zhao, Song and Qiu, "DOT: A Distillation-Oriented Trainer", ICCV 2023, arXiv:2307.08436. SGD
whose momentum is split: the task loss's gradient (the hard-label cross-entropy) accumulates in a
buffer with momentum ``m - delta``, the distillation loss's gradient in another with
``m + delta``, and the step applies both; the distillation term then steers more of the
optimisation. ``optimizer=dot`` (or ``cifar_row=kd_dot``, KD+DOT of mdistiller's README).

The update, as mdistiller's ``DistillationOrientedTrainer`` (``mdistiller/engine/dot.py``; lr,
weight decay ``wd``; the first step of a buffer takes the gradient itself, as torch's SGD):

- a parameter with both gradients: ``b_task = (m - delta) b_task + g_task + wd p``,
  ``b_kd = (m + delta) b_kd + g_kd`` (no weight decay on the distillation branch),
  ``p -= lr (b_task + b_kd)``;
- a parameter with the task's gradient only: ``b_task = m b_task + g_task + wd p``;
- a parameter with the distillation's only (a method's own parts, CRD's embeddings): ``b_kd =
  m b_kd + g_kd + wd p`` (no weight decay on its first step, as there).

The training module (``kd.training.module``) gives the split: the ``ce`` term is the task loss,
the other terms the distillation loss; their gradient is taken first
(``set_distillation_grads``), then the task loss's by the usual backward (``p.grad``). One device,
no gradient accumulation, no fp16 loss scaling (``check_dot``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from kd.errors import ConfigError


class DOT(torch.optim.Optimizer):
    """SGD with one momentum for the task's gradient and another for the distillation's.

    Args:
        params: The parameters (one group).
        lr: Learning rate.
        momentum: ``m``; the task's momentum is ``m - delta``, the distillation's ``m + delta``.
        delta: The split; 0.075 on CIFAR-100 and Tiny-ImageNet, 0.09 on ImageNet (mdistiller).
        weight_decay: L2 penalty, on the task's branch (see the module docstring).
        nesterov: Must be false (DOT has no Nesterov form); accepted so that ``optimizer=sgd``'s
            keys carry over.

    Raises:
        ConfigError: On a negative lr or weight decay, momenta outside [0, 1), or ``nesterov``.
    """

    splits_gradients = True  # the training module hands it the distillation terms' gradient

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, delta: float = 0.075,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if not lr >= 0:
            raise ConfigError("optimizer.lr", f"must be >= 0, got {lr}")
        if not weight_decay >= 0:
            raise ConfigError("optimizer.weight_decay", f"must be >= 0, got {weight_decay}")
        if not (0 <= momentum - delta and momentum + delta < 1):
            raise ConfigError("optimizer.delta", f"momentum - delta and momentum + delta must lie in [0, 1), got "
                              f"momentum {momentum}, delta {delta}")
        if nesterov:
            raise ConfigError("optimizer.nesterov", "DOT has no Nesterov form; set it to false")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        self._distill_grads: dict[nn.Parameter, Tensor] = {}

    def set_distillation_grads(self, grads: dict[nn.Parameter, Tensor]) -> None:
        """The distillation loss's gradient of each parameter it reaches, for the next ``step``."""
        self._distill_grads = {p: g.detach() for p, g in grads.items() if g is not None}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update; ``closure`` (Lightning's) computes both gradients first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            m, delta, wd, lr = group["momentum"], group["delta"], group["weight_decay"], group["lr"]
            for p in group["params"]:
                g_task, g_kd = p.grad, self._distill_grads.get(p)
                state = self.state[p]
                if g_task is not None:
                    d_p = g_task.add(p, alpha=wd) if wd else g_task.clone()
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        state["momentum_buffer"] = buf = d_p
                    else:
                        buf.mul_(m - delta if g_kd is not None else m).add_(d_p)
                    p.add_(buf, alpha=-lr)
                if g_kd is not None:
                    buf = state.get("momentum_kd_buffer")
                    if buf is None:
                        state["momentum_kd_buffer"] = buf = g_kd.clone()
                    elif g_task is not None:
                        buf.mul_(m + delta).add_(g_kd)
                    else:
                        buf.mul_(m).add_(g_kd.add(p, alpha=wd) if wd else g_kd)
                    p.add_(buf, alpha=-lr)
        self._distill_grads = {}
        return loss


def split_task_loss(optimizer: DOT, terms: dict[str, Tensor], params: list[nn.Parameter], zero: Tensor) -> Tensor:
    """Hands the distillation terms' gradient to ``optimizer``; returns the task loss to backpropagate.

    Args:
        optimizer: The DOT optimizer.
        terms: The method's weighted terms; ``ce`` (and a combination's ``<member>_ce``) is the task
            loss, the others the distillation's.
        params: The trainable parameters.
        zero: A zero with a graph to the student, the task loss when the method has no ``ce``
            term (as mdistiller, whose task loss is ``ce_weight * CE`` even at weight 0).
    """
    is_task = [k == "ce" or k.endswith("_ce") for k in terms]  # a combination's second CE: <member>_ce
    task = torch.stack([v for v, t in zip(terms.values(), is_task) if t]).sum() if any(is_task) else zero
    distill = [v for v, t in zip(terms.values(), is_task) if not t]
    if distill:
        grads = torch.autograd.grad(torch.stack(distill).sum(), params, retain_graph=True, allow_unused=True)
        optimizer.set_distillation_grads({p: g for p, g in zip(params, grads) if g is not None})
    return task


def check_dot(optimizer: Any, trainer: Any) -> None:
    """Refuses what DOT's split of the gradient cannot do, before training.

    Raises:
        ConfigError: Several devices (DDP reduces only the backward's gradient), gradient
            accumulation, or fp16 loss scaling.
    """
    if not getattr(getattr(optimizer, "func", optimizer), "splits_gradients", False):
        return
    if trainer.world_size > 1:
        raise ConfigError("optimizer", "DOT splits the gradient in two, which DDP does not reduce: run it on one device")
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError("trainer.accumulate_grad_batches", "DOT steps on each batch's two gradients: set it to 1")
    if "16-mixed" == str(trainer.precision):
        raise ConfigError("trainer.precision", "DOT's distillation gradient is not loss-scaled: use 32-true or bf16-mixed")
