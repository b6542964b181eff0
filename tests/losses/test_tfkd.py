"""Tf-KD: the virtual teacher's loss against its formula worked by hand and against the authors' released
code (its reg_alpha / multiplier and its self-teacher KD), and the experiment's conversions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from kd.errors import ConfigError
from kd.losses.tfkd import TfKDRegLoss, tfkd_reg_loss, virtual_teacher
from kd.outputs import ModelOutput


def _by_hand(s: np.ndarray, y: np.ndarray, T: float, a: float) -> float:
    total = 0.0
    for s_i, y_i in zip(s, y):
        k = len(s_i)
        u = [a if c == y_i else (1 - a) / (k - 1) for c in range(k)]
        q = [math.exp(v / T) / sum(math.exp(w / T) for w in u) for v in u]  # softmax of probabilities / T
        p = [math.exp(v) / sum(math.exp(w) for w in s_i) for v in s_i]  # the student at T = 1
        total += sum(qc * math.log(qc / pc) for qc, pc in zip(q, p))
    return total / len(s)


@pytest.mark.parametrize(("T", "a"), [(20.0, 0.99), (1.0, 0.9), (40.0, 0.5)])
def test_the_loss_matches_the_formula_worked_by_hand(T: float, a: float) -> None:
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=(5, 7)) * 3, rng.integers(0, 7, size=5)
    got = tfkd_reg_loss(torch.tensor(s), torch.tensor(y), T, a)
    assert got.item() == pytest.approx(_by_hand(s, y, T, a), rel=1e-9)


def test_the_virtual_teacher_puts_a_on_the_label_and_spreads_the_rest() -> None:
    u = virtual_teacher(torch.tensor([2, 0]), 4, 0.7)
    torch.testing.assert_close(u, torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.7, 0.1, 0.1, 0.1]]))


def _authors_reg(outputs: torch.Tensor, labels: torch.Tensor, alpha: float, T: float, multiplier: float) -> torch.Tensor:
    """my_loss_function.py::loss_kd_regularization of yuanli2333/Teacher-free-Knowledge-Distillation, on the CPU."""
    correct_prob = 0.99
    loss_ce = F.cross_entropy(outputs, labels)
    k = outputs.size(1)
    teacher_soft = torch.ones_like(outputs) * (1 - correct_prob) / (k - 1)
    for i in range(outputs.shape[0]):
        teacher_soft[i, labels[i]] = correct_prob
    soft = nn.KLDivLoss()(F.log_softmax(outputs, dim=1), F.softmax(teacher_soft / T, dim=1)) * multiplier
    return (1.0 - alpha) * loss_ce + alpha * soft


def _authors_self(outputs: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, alpha: float, T: float,
                  multiplier: float) -> torch.Tensor:
    """my_loss_function.py::loss_kd_self of the same repository."""
    loss_ce = F.cross_entropy(outputs, labels)
    d_kl = nn.KLDivLoss()(F.log_softmax(outputs / T, dim=1), F.softmax(teacher / T, dim=1)) * (T * T) * multiplier
    return (1.0 - alpha) * loss_ce + alpha * d_kl


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")  # the authors' KLDivLoss()
def test_the_experiment_rows_equal_the_authors_losses(make_cfg) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 100, dtype=torch.float64) * 4, torch.randn(8, 100, dtype=torch.float64) * 4
    y = torch.randint(0, 100, (8,))
    batch = {"input": torch.zeros(8), "target": y}
    reg = instantiate(make_cfg("experiment=cifar100_tfkd_resnet18", "tfkd_row=reg", fast=False).distill)
    got = sum(reg(ModelOutput(s, {}), None, batch).values())
    # base_resnet18/params.json: reg_alpha 0.1, reg_temperature 20, multiplier 100
    # rel 1e-6: kd computes the hard-label CE in fp32 (DistillationLoss), the rest in the logits' float64
    assert got.item() == pytest.approx(_authors_reg(s, y, 0.1, 20.0, 100.0).item(), rel=1e-6)
    self_kd = instantiate(make_cfg("experiment=cifar100_tfkd_resnet18", "tfkd_row=self", fast=False).distill)
    got = sum(self_kd(ModelOutput(s, {}), ModelOutput(t, {}), batch).values())
    # resnet18_self_teacher/params.json: alpha 0.95, temperature 6, multiplier 50
    assert got.item() == pytest.approx(_authors_self(s, y, t, 0.95, 6.0, 50.0).item(), rel=1e-6)


def test_the_gradient_pulls_the_student_towards_the_softened_virtual_teacher() -> None:
    s = torch.zeros(1, 5, requires_grad=True)
    tfkd_reg_loss(s, torch.tensor([3]), 2.0, 0.99).backward()
    q = F.softmax(virtual_teacher(torch.tensor([3]), 5, 0.99) / 2.0, dim=-1)
    torch.testing.assert_close(s.grad, F.softmax(s.detach(), dim=-1) - q)  # d KL / d s = p - q
    assert s.grad[0, 3] < 0 and (s.grad[0, [0, 1, 2, 4]] > 0).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"correct_prob": 0.0}, "correct_prob: must be in (0, 1), got 0"),
    ({"correct_prob": 1.0}, "correct_prob: must be in [0, 1), got 1"),
    ({"temperature": 0.0}, "temperature: must be > 0"),
    ({"weight": -1.0}, "weight: must be"),
])
def test_bad_settings_are_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        TfKDRegLoss(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_config_file_builds_the_loss() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "distill" / "tfkd_reg.yaml")
    loss = instantiate(node)
    assert isinstance(loss, TfKDRegLoss) and not loss.requires_teacher
    assert (loss.temperature, loss.correct_prob, loss.ce_weight) == (20.0, 0.99, 0.9)
