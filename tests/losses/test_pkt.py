"""PKT: the KL of cosine-kernel neighbour probabilities, by hand; invariances; gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd.errors import ConfigError
from kd.losses.pkt import PKTLoss, pkt_loss, pkt_probabilities
from kd.outputs import ModelOutput


def out(**features: torch.Tensor) -> ModelOutput:
    b = next(iter(features.values())).shape[0]
    return ModelOutput(logits=torch.zeros(b, 3), features=features)


def hand_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    b = len(s)

    def probs(e: np.ndarray) -> list[list[float]]:
        unit = [v / (math.sqrt(sum(x * x for x in v)) + eps) for v in e]
        k = [[(float(unit[i] @ unit[j]) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[k[i][j] / sum(k[i]) for j in range(b)] for i in range(b)]

    p, q = probs(t), probs(s)
    kl = sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(b) for j in range(b))
    return kl / b**2


def test_matches_the_kernel_kl_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)  # another width
    assert pkt_loss(s, t).item() == pytest.approx(hand_pkt(s.numpy(), t.numpy()), rel=1e-6)
    p = pkt_probabilities(t)
    assert torch.allclose(p.sum(dim=1), torch.ones(5, dtype=torch.float64))
    # Two orthogonal samples: kernel (0 + 1) / 2 = 0.5 off the diagonal, 1 on it -> rows 2/3, 1/3.
    p2 = pkt_probabilities(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(p2, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]), atol=1e-6)


def test_the_module_applies_weight_and_sums_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    s1, s2, t1, t2 = (torch.randn(4, d, generator=g) for d in (3, 6, 8, 2))
    loss = PKTLoss(["a", "b"], ["x", "y"], weight=30000.0, ce_weight=0.0)
    terms = loss(out(a=s1, b=s2), out(x=t1, y=t2), {"target": torch.zeros(4, dtype=torch.long)})
    assert set(terms) == {"pkt"}
    expected = 30000 * (pkt_loss(s1, t1) + pkt_loss(s2, t2)).item()
    assert terms["pkt"].item() == pytest.approx(expected, rel=1e-5)


def test_zero_for_the_teacher_and_for_a_rotated_rescaled_wider_copy() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(8, 5, generator=g)
    loss = PKTLoss(["s"], ["t"])
    assert loss.loss_terms(out(s=t.clone()), out(t=t), {})["pkt"].item() == 0.0
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    scale = torch.rand(8, 1, generator=g, dtype=torch.float64) + 0.5  # any positive scale per sample
    s = (scale * t.double() @ q[:5]).float()  # (8, 9)
    assert loss.loss_terms(out(s=s), out(t=t), {})["pkt"].item() == pytest.approx(0.0, abs=1e-7)
    other = loss.loss_terms(out(s=torch.randn(8, 9, generator=g)), out(t=t), {})["pkt"].item()
    assert other > 1e-4


def test_gradients_reach_the_student_and_never_the_teacher() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4, generator=g, requires_grad=True)
    t = torch.randn(6, 10, generator=g, requires_grad=True)
    PKTLoss(["s"], ["t"]).loss_terms(out(s=s), out(t=t), {})["pkt"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_maps_are_flattened_and_bf16_is_computed_in_fp32() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 2, 2, 2, generator=g), torch.randn(4, 3, generator=g)
    loss = PKTLoss(["s"], ["t"])
    maps = loss.loss_terms(out(s=s), out(t=t), {})["pkt"]
    flat = loss.loss_terms(out(s=s.flatten(1)), out(t=t), {})["pkt"]
    assert maps.item() == pytest.approx(flat.item(), rel=1e-6)
    assert loss.loss_terms(out(s=s.bfloat16()), out(t=t.bfloat16()), {})["pkt"].dtype == torch.float32


def test_bf16_autocast_gives_the_fp32_value_of_a_near_copy() -> None:
    # The student differs from the teacher by 1e-3: a bf16 kernel would round the probabilities
    # by more than the differences the loss measures.
    g = torch.Generator().manual_seed(5)
    t = torch.randn(16, 64, generator=g)
    s = t + 1e-3 * torch.randn(16, 64, generator=g)
    loss = PKTLoss(["s"], ["t"])
    full = loss.loss_terms(out(s=s), out(t=t), {})["pkt"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss.loss_terms(out(s=s), out(t=t), {})["pkt"]
    torch.testing.assert_close(low, full, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"eps": 0.0}, {"eps": -1e-7}, {"weight": -1.0}, {"teacher_nodes": ["t", "u"]}, {"student_nodes": []}],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict) -> None:
    args = {"student_nodes": ["s"], "teacher_nodes": ["t"], **kwargs}
    with pytest.raises(ConfigError):
        PKTLoss(**args)
