"""The loss strategies against values derived by hand from their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.errors import ConfigError
from kd.losses import CrossEntropy, KDLoss, kd_loss
from kd.outputs import ModelOutput


def _kl_by_hand(s: list[float], t: list[float], T: float) -> float:
    """KL(softmax(t/T) || softmax(s/T)) for one sample, in plain Python."""
    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v / T) for v in z]
        return [v / sum(e) for v in e]

    p_t, p_s = softmax(t), softmax(s)
    return sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))


def test_kd_loss_matches_a_value_worked_by_hand() -> None:
    # s/T = [0, 0] and t/T = [ln 3, 0]: p_s = (1/2, 1/2), p_t = (3/4, 1/4), so
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120, and T^2 = 4 multiplies it.
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert kd_loss(s, t, temperature=2.0).item() == pytest.approx(4 * 0.1308120, abs=1e-6)
    assert kd_loss(s, t / 2, temperature=1.0).item() == pytest.approx(0.1308120, abs=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
def test_kd_loss_is_batch_mean_of_kl_times_T_squared(T: float) -> None:
    s = [[1.0, 2.0, 3.0, -1.0], [0.5, -0.5, 2.0, 0.0], [3.0, 1.0, 0.0, 1.0]]
    t = [[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 4.0, -2.0], [2.0, 2.0, 0.5, 1.5]]
    expected = T**2 * sum(_kl_by_hand(a, b, T) for a, b in zip(s, t)) / len(s)
    got = kd_loss(torch.tensor(s), torch.tensor(t), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0, 8.0])
def test_kd_gradient_wrt_student_logits(T: float) -> None:
    torch.manual_seed(0)
    B, C = 6, 7
    s = torch.randn(B, C, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, C, dtype=torch.float64) * 3
    kd_loss(s, t, temperature=T).backward()
    expected = (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) * T / B
    torch.testing.assert_close(s.grad, expected, rtol=1e-10, atol=1e-12)


def test_kd_loss_of_half_precision_logits_is_computed_in_fp32() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(4, 100) * 5, torch.randn(4, 100) * 5
    low = kd_loss(s.bfloat16(), t.bfloat16(), 4.0)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(kd_loss(s.bfloat16().float(), t.bfloat16().float(), 4.0).item(), rel=1e-6)


def test_kd_loss_is_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    z = torch.randn(5, 10)
    assert kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(z + 7.0, z, 4.0).item() == pytest.approx(0.0, abs=1e-5)  # softmax is shift-invariant
    assert kd_loss(z.flip(-1), z, 4.0).item() > 1e-3


def _outputs(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    return ModelOutput(logits=s), ModelOutput(logits=t), {"target": y}


@pytest.mark.parametrize("alpha", [0.3, 0.9, 1.0])
def test_kd_strategy_weights_terms(alpha: float) -> None:
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 3, 9, 3])
    terms = KDLoss(temperature=3.0, weight=alpha, ce_weight=1 - alpha)(*_outputs(s, t, y))
    assert set(terms) == ({"ce", "kd"} if alpha < 1 else {"kd"})  # a zero CE weight leaves CE out
    if alpha < 1:
        assert terms["ce"].item() == pytest.approx((1 - alpha) * F.cross_entropy(s, y).item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(alpha * kd_loss(s, t, 3.0).item(), rel=1e-6, abs=1e-9)


def test_cross_entropy_matches_hand_value() -> None:
    # logits (0, ln 3), label 1: p = 3/4, loss = -ln(3/4) = 0.2876821
    s = torch.tensor([[0.0, math.log(3.0)]])
    terms = CrossEntropy()(ModelOutput(logits=s), None, {"target": torch.tensor([1])})
    assert set(terms) == {"ce"}
    assert terms["ce"].item() == pytest.approx(0.2876821, abs=1e-6)
    # label smoothing 0.5 over 2 classes: targets (1/4, 3/4): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351
    terms = CrossEntropy(label_smoothing=0.5)(ModelOutput(logits=s), None, {"target": torch.tensor([1])})
    assert terms["ce"].item() == pytest.approx(0.5623351, abs=1e-6)
    assert not CrossEntropy.requires_teacher and KDLoss.requires_teacher


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"weight": -0.1}, "weight"),
        ({"ce_weight": -0.1}, "ce_weight"),
        ({"weight": float("nan")}, "weight"),
        ({"ce_weight": float("inf")}, "ce_weight"),
    ],
)
def test_kd_strategy_rejects_out_of_range_hyperparameters(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        KDLoss(**kwargs)
    assert err.value.key == key
    assert "\n" not in str(err.value)


def test_cross_entropy_rejects_label_smoothing_of_one() -> None:
    with pytest.raises(ConfigError):
        CrossEntropy(label_smoothing=1.0)
