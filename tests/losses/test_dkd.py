"""DKD against its formula, the paper's KD decomposition, and mdistiller's recipe."""

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
from kd.losses.dkd import DKDLoss, dkd_loss
from kd.losses.kd import kd_loss
from kd.losses.schedules import LinearWarmup
from kd.outputs import ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf" / "distill" / "dkd.yaml"


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def _dkd_by_hand(
    s: np.ndarray, t: np.ndarray, y: np.ndarray, alpha: float, beta: float, T: float
) -> tuple[float, float]:
    """DKD as the paper defines it, sample by sample in plain numpy: the NCKD distribution is the softmax
    over the non-target classes only (what mdistiller's -1000 mask amounts to)."""
    tckd = nckd = 0.0
    for s_i, t_i, y_i in zip(s, t, y):
        p_s = np.exp(s_i / T) / np.exp(s_i / T).sum()
        p_t = np.exp(t_i / T) / np.exp(t_i / T).sum()
        b_s = np.array([p_s[y_i], 1 - p_s[y_i]])
        b_t = np.array([p_t[y_i], 1 - p_t[y_i]])
        others = [j for j in range(len(s_i)) if j != y_i]
        q_s = p_s[others] / p_s[others].sum()
        q_t = p_t[others] / p_t[others].sum()
        tckd += _kl(b_t, b_s)
        nckd += _kl(q_t, q_s)
    n = len(s)
    return alpha * T**2 * tckd / n, beta * T**2 * nckd / n


@pytest.mark.parametrize(("alpha", "beta", "T"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 6.0, 3.0)])
def test_dkd_matches_the_formula_worked_by_hand(alpha: float, beta: float, T: float) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 6)) * 3, rng.normal(size=(5, 6)) * 3
    y = np.array([0, 5, 2, 2, 3])
    tckd, nckd = dkd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha, beta, T)
    want_tckd, want_nckd = _dkd_by_hand(s, t, y, alpha, beta, T)
    assert tckd.item() == pytest.approx(want_tckd, rel=1e-9)
    assert nckd.item() == pytest.approx(want_nckd, rel=1e-9)


def test_kd_is_tckd_plus_teacher_non_target_mass_times_nckd() -> None:
    # The paper's reformulation of KD (Sec. 3.1): KD = TCKD + (1 - p_t^T) * NCKD, sample by sample.
    torch.manual_seed(0)
    T = 4.0
    s, t = torch.randn(6, 10, dtype=torch.float64) * 4, torch.randn(6, 10, dtype=torch.float64) * 4
    y = torch.tensor([0, 9, 3, 3, 7, 1])
    for i in range(6):
        s_i, t_i, y_i = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        tckd, nckd = dkd_loss(s_i, t_i, y_i, 1.0, 1.0, T)
        p_target = torch.softmax(t_i / T, dim=1)[0, y_i].item()
        assert kd_loss(s_i, t_i, T).item() == pytest.approx(tckd.item() + (1 - p_target) * nckd.item(), rel=1e-9)


def test_dkd_is_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    torch.manual_seed(1)
    z, y = torch.randn(8, 10) * 3, torch.randint(0, 10, (8,))
    for term in dkd_loss(z, z.clone(), y, 1.0, 8.0, 4.0):
        assert term.item() == pytest.approx(0.0, abs=1e-5)
    tckd, nckd = dkd_loss(z.flip(-1), z, y, 1.0, 8.0, 4.0)
    assert tckd.item() > 1e-4 and nckd.item() > 1e-3


def test_dkd_of_half_precision_logits_is_computed_in_fp32() -> None:
    torch.manual_seed(2)
    s, t, y = torch.randn(4, 100) * 5, torch.randn(4, 100) * 5, torch.randint(0, 100, (4,))
    low = dkd_loss(s.bfloat16(), t.bfloat16(), y, 1.0, 8.0, 4.0)
    high = dkd_loss(s.bfloat16().float(), t.bfloat16().float(), y, 1.0, 8.0, 4.0)
    for a, b in zip(low, high):
        assert a.dtype == torch.float32 and torch.isfinite(a)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_gradients_reach_the_student_logits_and_never_the_teacher() -> None:
    torch.manual_seed(3)
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    loss = DKDLoss()
    terms = loss(ModelOutput(s), ModelOutput(t), {"target": torch.tensor([1, 2, 3, 4])}, epoch=30)
    sum(terms.values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_the_module_weights_terms_and_warms_up_over_20_epochs() -> None:
    torch.manual_seed(4)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    loss = DKDLoss(temperature=4.0, alpha=1.0, beta=8.0, weight=LinearWarmup(1.0, 20), ce_weight=1.0)
    tckd, nckd = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    for epoch, w in [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (200, 1.0)]:
        terms = loss(ModelOutput(s), ModelOutput(t), {"target": y}, epoch=epoch)
        assert set(terms) == {"ce", "tckd", "nckd"}
        assert terms["tckd"].item() == pytest.approx(w * tckd.item(), rel=1e-6)
        assert terms["nckd"].item() == pytest.approx(w * nckd.item(), rel=1e-6)
        assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_config_is_the_cifar_recipe_with_an_explicit_warmup() -> None:
    loss = instantiate(OmegaConf.load(CONF))
    assert isinstance(loss, DKDLoss)
    assert (loss.temperature, loss.alpha, loss.beta, loss.ce_weight) == (4.0, 1.0, 8.0, 1.0)
    assert isinstance(loss.weight, LinearWarmup) and (loss.weight.value, loss.weight.epochs) == (1.0, 20)
    assert loss.requires_teacher and not loss.student_nodes and not loss.teacher_nodes


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"temperature": 0.0}, "temperature"), ({"temperature": -4.0}, "temperature"), ({"alpha": -1.0}, "alpha"),
     ({"beta": float("nan")}, "beta"), ({"beta": "8"}, "beta"), ({"ce_weight": -0.1}, "ce_weight"),
     ({"weight": -1.0}, "weight")],
)
def test_bad_hyperparameters_raise_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        DKDLoss(**kwargs)
    assert err.value.key == key
