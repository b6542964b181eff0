"""RKD: distance and angle terms against a loop-by-loop reading of the paper, invariances, gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kd.errors import ConfigError
from kd.losses.rkd import RKDLoss, rkd_angle_loss, rkd_distance_loss
from kd.outputs import ModelOutput


def out(**features: torch.Tensor) -> ModelOutput:
    b = next(iter(features.values())).shape[0]
    return ModelOutput(logits=torch.zeros(b, 3), features=features)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def hand_distance(s: np.ndarray, t: np.ndarray) -> float:
    b = len(s)

    def psi(e: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        mu = sum(d[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return d / mu

    ps, pt = psi(s), psi(t)
    return sum(huber(ps[i, j] - pt[i, j]) for i in range(b) for j in range(b)) / b**2


def hand_angle(s: np.ndarray, t: np.ndarray) -> float:
    b = len(s)

    def cos(e: np.ndarray, i: int, j: int, k: int) -> float:
        if i == j or k == j:
            return 0.0
        u, v = e[i] - e[j], e[k] - e[j]
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    total = sum(huber(cos(s, i, j, k) - cos(t, i, j, k)) for i, j, k in itertools.product(range(b), repeat=3))
    return total / b**3


def test_distance_and_angle_match_the_paper_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(4, 5, generator=g, dtype=torch.float64)  # another width
    assert rkd_distance_loss(s, t).item() == pytest.approx(hand_distance(s.numpy(), t.numpy()), rel=1e-6)
    assert rkd_angle_loss(s, t).item() == pytest.approx(hand_angle(s.numpy(), t.numpy()), rel=1e-6)
    # A large gap exercises the linear branch of the Huber loss.
    t2 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 0.1], [0.0, 0.2]], dtype=torch.float64)
    s2 = s[:, :2]
    assert rkd_distance_loss(s2, t2).item() == pytest.approx(hand_distance(s2.numpy(), t2.numpy()), rel=1e-6)


def test_the_module_applies_w_d_w_a_weight_and_ce() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 8, generator=g)
    loss = RKDLoss(["s"], ["t"], w_d=25, w_a=50, weight=2.0, ce_weight=1.0)
    batch = {"target": torch.zeros(6, dtype=torch.long)}
    terms = loss(out(s=s), out(t=t), batch)
    assert set(terms) == {"ce", "rkd_distance", "rkd_angle"}
    assert terms["rkd_distance"].item() == pytest.approx(2 * 25 * rkd_distance_loss(s, t).item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(2 * 50 * rkd_angle_loss(s, t).item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-5)
    only_d = RKDLoss(["s"], ["t"], w_a=0)(out(s=s), out(t=t), batch)
    assert set(only_d) == {"ce", "rkd_distance"}


def test_zero_for_the_teacher_and_for_a_rotated_scaled_shifted_wider_copy() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(8, 5, generator=g)
    loss = RKDLoss(["s"], ["t"])
    same = loss.loss_terms(out(s=t.clone()), out(t=t), {})
    assert all(v.item() == pytest.approx(0.0, abs=1e-6) for v in same.values())
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    s = (3.7 * t.double() @ q[:5] + torch.randn(7, generator=g, dtype=torch.float64)).float()  # (8, 7)
    copy = loss.loss_terms(out(s=s), out(t=t), {})
    assert copy["rkd_distance"].item() == pytest.approx(0.0, abs=1e-4)
    assert copy["rkd_angle"].item() == pytest.approx(0.0, abs=1e-4)
    other = loss.loss_terms(out(s=torch.randn(8, 7, generator=g)), out(t=t), {})
    assert other["rkd_distance"].item() > 1e-2 and other["rkd_angle"].item() > 1e-2


def test_gradients_reach_the_student_and_never_the_teacher() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 4, generator=g, requires_grad=True)
    t = torch.randn(5, 6, generator=g, requires_grad=True)
    terms = RKDLoss(["s"], ["t"]).loss_terms(out(s=s), out(t=t), {})
    sum(terms.values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_maps_are_flattened_and_bf16_is_computed_in_fp32() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 16, generator=g)
    loss = RKDLoss(["s"], ["t"])
    flat = loss.loss_terms(out(s=s.flatten(1)), out(t=t), {})
    maps = loss.loss_terms(out(s=s), out(t=t), {})
    assert all(maps[k].item() == pytest.approx(flat[k].item(), rel=1e-6) for k in flat)
    low = loss.loss_terms(out(s=s.bfloat16()), out(t=t.bfloat16()), {})
    assert all(v.dtype == torch.float32 for v in low.values())


def test_bf16_autocast_gives_the_fp32_value_of_a_near_copy() -> None:
    # The student differs from the teacher by 1e-3: bf16 products (8-bit mantissa) would round
    # the distances and cosines by more than the differences the loss measures.
    g = torch.Generator().manual_seed(5)
    t = torch.randn(16, 64, generator=g)
    s = t + 1e-3 * torch.randn(16, 64, generator=g)
    loss = RKDLoss(["s"], ["t"])
    full = loss.loss_terms(out(s=s), out(t=t), {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss.loss_terms(out(s=s), out(t=t), {})
    for k in full:
        torch.testing.assert_close(low[k], full[k], rtol=1e-3, atol=0.0)


def test_a_batch_without_distinct_samples_gives_zero_not_nan() -> None:
    loss = RKDLoss(["s"], ["t"])
    one = loss.loss_terms(out(s=torch.randn(1, 4)), out(t=torch.randn(1, 8)), {})
    same = loss.loss_terms(out(s=torch.ones(3, 4)), out(t=torch.ones(3, 8)), {})
    assert all(v.item() == 0.0 for v in [*one.values(), *same.values()])


@pytest.mark.parametrize(
    "kwargs",
    [{"w_d": -1.0}, {"w_a": float("nan")}, {"w_d": 0.0, "w_a": 0.0}, {"weight": -1.0}, {"ce_weight": -0.1},
     {"student_nodes": ["a", "b"]}, {"student_nodes": [], "teacher_nodes": []}],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict) -> None:
    args = {"student_nodes": ["s"], "teacher_nodes": ["t"], **kwargs}
    with pytest.raises(ConfigError):
        RKDLoss(**args)
