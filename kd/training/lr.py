"""Learning-rate schedules the recipes need beyond torch's own, as ``_partial_`` factories of an optimizer."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from kd.errors import check_int


def warmup_cosine(optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 5, warmup_lr: float = 1e-6,
                  min_lr: float = 1e-5) -> LambdaLR:
    """timm's ``CosineLRScheduler`` per epoch, as DeiT trains (facebookresearch/deit ``main.py``).

    Epoch ``e < warmup_epochs``: ``warmup_lr + e * (lr - warmup_lr) / warmup_epochs``; then
    ``min_lr + (lr - min_lr) * (1 + cos(pi * e / max_epochs)) / 2`` (e not shifted by the warm-up,
    timm's default), ``lr`` being each parameter group's initial learning rate.

    Raises:
        ConfigError: On epochs that are not integers >= 1 (warm-up: >= 0).
    """
    check_int("scheduler.max_epochs", max_epochs, 1, valid=">= 1")
    check_int("scheduler.warmup_epochs", warmup_epochs, 0, valid=">= 0")
    bases = [group["lr"] for group in optimizer.param_groups]

    def factor(base: float):  # noqa: ANN202 - a closure per group
        def at(epoch: int) -> float:
            if epoch < warmup_epochs:
                return (warmup_lr + epoch * (base - warmup_lr) / warmup_epochs) / base
            return (min_lr + (base - min_lr) * (1 + math.cos(math.pi * min(epoch, max_epochs) / max_epochs)) / 2) / base
        return at

    return LambdaLR(optimizer, [factor(b) for b in bases])
