"""Distillation loss strategies: one ``nn.Module`` per method, returning named weighted terms."""

from kd.losses.base import DistillationLoss
from kd.losses.ce import CrossEntropy
from kd.losses.kd import KDLoss, kd_loss

__all__ = ["CrossEntropy", "DistillationLoss", "KDLoss", "kd_loss"]
