"""DIST against Pearson correlations computed by hand, and its CIFAR defaults."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd.errors import ConfigError
from kd.losses.dist import DISTLoss, dist_loss
from kd.outputs import ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf" / "distill" / "dist.yaml"


def _pearson(x: list[float], y: list[float], eps: float = 1e-8) -> float:
    """Pearson's r, with the authors' 1e-8 added to the product of the norms (it shows on
    columns of small probabilities)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / (math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)) + eps)


def _dist_by_hand(s: np.ndarray, t: np.ndarray, tau: float) -> tuple[float, float]:
    y_s = np.exp(s / tau) / np.exp(s / tau).sum(1, keepdims=True)
    y_t = np.exp(t / tau) / np.exp(t / tau).sum(1, keepdims=True)
    b, c = s.shape
    inter = 1 - sum(_pearson(list(y_s[i]), list(y_t[i])) for i in range(b)) / b
    intra = 1 - sum(_pearson(list(y_s[:, j]), list(y_t[:, j])) for j in range(c)) / c
    return tau**2 * inter, tau**2 * intra


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_matches_pearson_correlations_worked_by_hand(tau: float) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    inter, intra = dist_loss(torch.tensor(s), torch.tensor(t), tau)
    want_inter, want_intra = _dist_by_hand(s, t, tau)
    assert inter.item() == pytest.approx(want_inter, rel=1e-9)
    assert intra.item() == pytest.approx(want_intra, rel=1e-9)


def test_dist_is_zero_when_student_equals_teacher_and_at_most_2_tau2_per_term() -> None:
    torch.manual_seed(0)
    z = torch.randn(8, 10) * 3
    for term in dist_loss(z, z.clone(), 4.0):
        assert term.item() == pytest.approx(0.0, abs=1e-5)
    # Perfectly anti-correlated rows reach the maximum 1 - (-1) = 2, times tau^2.
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    inter, _ = dist_loss(s, t, 1.0)
    assert inter.item() == pytest.approx(2.0, abs=1e-6)


def test_dist_of_half_precision_logits_is_computed_in_fp32() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(4, 100) * 5, torch.randn(4, 100) * 5
    low = dist_loss(s.bfloat16(), t.bfloat16(), 4.0)
    high = dist_loss(s.bfloat16().float(), t.bfloat16().float(), 4.0)
    for a, b in zip(low, high):
        assert a.dtype == torch.float32
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_module_returns_beta_and_gamma_weighted_terms_and_ce() -> None:
    torch.manual_seed(2)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    inter, intra = dist_loss(s, t, 4.0)
    loss = DISTLoss(tau=4.0, beta=2.0, gamma=3.0, weight=0.5, ce_weight=1.0)
    terms = loss(ModelOutput(s), ModelOutput(t), {"target": y})
    assert set(terms) == {"ce", "dist_inter", "dist_intra"}
    assert terms["dist_inter"].item() == pytest.approx(0.5 * 2.0 * inter.item(), rel=1e-6)
    assert terms["dist_intra"].item() == pytest.approx(0.5 * 3.0 * intra.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_gradients_reach_the_student_logits_and_never_the_teacher() -> None:
    torch.manual_seed(3)
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    terms = DISTLoss()(ModelOutput(s), ModelOutput(t), {"target": torch.tensor([1, 2, 3, 4])})
    (terms["dist_inter"] + terms["dist_intra"]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_config_is_the_cifar_recipe() -> None:
    loss = instantiate(OmegaConf.load(CONF))
    assert isinstance(loss, DISTLoss)
    assert (loss.tau, loss.beta, loss.gamma, loss.ce_weight, loss.weight(0)) == (4.0, 2.0, 2.0, 1.0, 1.0)
    assert loss.requires_teacher and not loss.student_nodes and not loss.teacher_nodes


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"tau": 0.0}, "tau"), ({"tau": float("inf")}, "tau"), ({"beta": -2.0}, "beta"), ({"gamma": -0.5}, "gamma"),
     ({"gamma": None}, "gamma"), ({"ce_weight": -1.0}, "ce_weight")],
)
def test_bad_hyperparameters_raise_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        DISTLoss(**kwargs)
    assert err.value.key == key
