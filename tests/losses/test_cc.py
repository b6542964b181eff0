"""CC: the Taylor-series RBF correlation matrix by hand, the student embedding, gradients."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from kd.errors import ConfigError
from kd.losses.cc import CCLoss, cc_loss, correlation_matrix
from kd.outputs import DataInfo, ModelOutput

DATA = DataInfo(num_classes=3, num_samples=10)


def out(**features: torch.Tensor) -> ModelOutput:
    b = next(iter(features.values())).shape[0]
    return ModelOutput(logits=torch.zeros(b, 3), features=features)


@contextmanager
def _bf16_true() -> Iterator[None]:
    """As Lightning's ``bf16-true`` forward context: tensors created without a dtype are bf16."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _bf16(out: ModelOutput) -> ModelOutput:
    """A copy of ``out`` in bf16, as a ``bf16-true`` model gives, with fresh leaf features."""
    features = {k: v.detach().bfloat16().requires_grad_() for k, v in out.features.items()}
    return ModelOutput(out.logits.detach().bfloat16(), features)


def hand_psi(e: np.ndarray, gamma: float, order: int) -> np.ndarray:
    unit = [v / np.linalg.norm(v) for v in e]
    b = len(e)
    psi = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            c = float(unit[i] @ unit[j])
            terms = [(2 * gamma) ** p / math.factorial(p) * c**p for p in range(order + 1)]
            psi[i, j] = math.exp(-2 * gamma) * sum(terms)
    return psi


def test_correlation_and_loss_match_the_paper_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.randn(4, 3, generator=g, dtype=torch.float64)
    assert np.allclose(correlation_matrix(s, 0.4, 2).numpy(), hand_psi(s.numpy(), 0.4, 2))
    expected = ((hand_psi(t.numpy(), 0.4, 2) - hand_psi(s.numpy(), 0.4, 2)) ** 2).sum() / 16
    assert cc_loss(s, t, 0.4, 2).item() == pytest.approx(expected, rel=1e-9)
    # Orthogonal unit rows, P = 2: e^-0.8 (1 + 0.8 + 0.32) on the diagonal (cos 1), e^-0.8 off it (cos 0).
    psi = correlation_matrix(torch.eye(2, dtype=torch.float64), 0.4, 2)
    assert psi[0, 0].item() == pytest.approx(math.exp(-0.8) * 2.12)
    assert psi[0, 1].item() == pytest.approx(math.exp(-0.8))


def test_a_long_taylor_series_is_the_gaussian_rbf_of_normalised_rows() -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(5, 4, generator=g, dtype=torch.float64)
    x = e / e.norm(dim=1, keepdim=True)
    rbf = torch.exp(-0.4 * torch.cdist(x, x).pow(2))
    assert torch.allclose(correlation_matrix(e, 0.4, 20), rbf, atol=1e-10)


def test_equal_widths_need_no_embedding_and_the_teacher_gives_zero() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 5, generator=g)
    loss = CCLoss(["s"], ["t"], weight=1.0)
    loss.setup(out(s=t[:2]), out(t=t[:2]), DATA)
    assert isinstance(loss.embeds[0], nn.Identity) and not list(loss.parameters())
    assert loss.loss_terms(out(s=t.clone()), out(t=t), {})["cc"].item() == 0.0
    # Only directions count: a rescaled, rotated copy also gives zero.
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert loss.loss_terms(out(s=2.5 * t @ q), out(t=t), {})["cc"].item() == pytest.approx(0.0, abs=1e-10)


def test_unequal_widths_get_a_learned_linear_embedding_that_can_reach_zero() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 4, generator=g)
    a = torch.randn(7, 4, generator=g)
    t = s @ a.t()  # (6, 7): the teacher is a linear map of the student
    loss = CCLoss(["s"], ["t"], weight=0.003)
    loss.setup(out(s=s[:2]), out(t=t[:2]), DATA)
    embed = loss.embeds[0]
    assert isinstance(embed, nn.Linear) and (embed.in_features, embed.out_features) == (4, 7)
    assert {k for k in loss.state_dict()} == {"embeds.0.weight", "embeds.0.bias"}  # saved in checkpoints
    assert loss.loss_terms(out(s=s), out(t=t), {})["cc"].item() > 1e-4
    with torch.no_grad():
        embed.weight.copy_(a)
        embed.bias.zero_()
    assert loss.loss_terms(out(s=s), out(t=t), {})["cc"].item() == pytest.approx(0.0, abs=1e-10)


def test_the_module_applies_the_weight_to_the_embedded_student() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 8, generator=g)
    loss = CCLoss(["s"], ["t"], gamma=0.5, order=3, weight=2.0, ce_weight=0.0)
    loss.setup(out(s=s), out(t=t), DATA)
    terms = loss(out(s=s), out(t=t), {"target": torch.zeros(5, dtype=torch.long)})
    assert set(terms) == {"cc"}
    expected = 2.0 * cc_loss(loss.embeds[0](s), t, 0.5, 3).item()
    assert terms["cc"].item() == pytest.approx(expected, rel=1e-6)


def test_gradients_reach_the_student_and_its_embedding_never_the_teacher() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 4, generator=g, requires_grad=True)
    t = torch.randn(6, 9, generator=g, requires_grad=True)
    loss = CCLoss(["s"], ["t"])
    loss.setup(out(s=s.detach()), out(t=t.detach()), DATA)
    loss.loss_terms(out(s=s), out(t=t), {})["cc"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())
    assert t.grad is None


def test_maps_flatten_when_widths_agree_and_fail_clearly_when_they_do_not() -> None:
    loss = CCLoss(["s"], ["t"])
    maps = out(s=torch.randn(2, 2, 2, 2))
    loss.setup(maps, out(t=torch.randn(2, 8)), DATA)  # 2 * 2 * 2 = 8
    assert isinstance(loss.embeds[0], nn.Identity)
    with pytest.raises(ConfigError, match="pooled"):
        loss.setup(out(s=torch.randn(2, 4, 3, 3)), out(t=torch.randn(2, 8)), DATA)
    with pytest.raises(RuntimeError, match="setup"):
        CCLoss(["s"], ["t"]).loss_terms(out(s=torch.randn(2, 8)), out(t=torch.randn(2, 8)), {})


def test_bf16_features_are_computed_in_fp32() -> None:
    loss = CCLoss(["s"], ["t"])
    loss.setup(out(s=torch.randn(2, 4)), out(t=torch.randn(2, 4)), DATA)
    s, t = torch.randn(4, 4).bfloat16(), torch.randn(4, 4).bfloat16()
    value = loss.loss_terms(out(s=s), out(t=t), {})["cc"]
    assert value.dtype == torch.float32


def test_bf16_autocast_gives_the_fp32_value_of_a_near_copy() -> None:
    # Equal widths (no learned embedding, which autocast may run in bf16). The student differs
    # from the teacher by 1e-3: bf16 similarities would round by more than that.
    g = torch.Generator().manual_seed(6)
    t = torch.randn(16, 64, generator=g)
    s = t + 1e-3 * torch.randn(16, 64, generator=g)
    loss = CCLoss(["s"], ["t"])
    loss.setup(out(s=s[:2]), out(t=t[:2]), DATA)
    full = loss.loss_terms(out(s=s), out(t=t), {})["cc"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss.loss_terms(out(s=s), out(t=t), {})["cc"]
    torch.testing.assert_close(low, full, rtol=1e-3, atol=0.0)


def test_a_bf16_module_runs_forward_and_backward_on_bf16_features() -> None:
    # precision="bf16-true" converts the loss (the student's linear embedding) to bf16 and feeds bf16 features.
    g = torch.Generator().manual_seed(7)
    student, teacher = out(s=torch.randn(8, 4, generator=g)), out(t=torch.randn(8, 6, generator=g))
    loss = CCLoss(["s"], ["t"], weight=1.0)
    loss.setup(student, teacher, DATA)
    expected = loss.loss_terms(student, teacher, {})["cc"].item()  # the fp32 module on fp32 features
    loss = loss.to(torch.bfloat16)
    s, t = _bf16(student), _bf16(teacher)
    with _bf16_true():
        value = loss(s, t, {"target": torch.zeros(8, dtype=torch.long)})["cc"]
    value.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=2e-2)
    for p in loss.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and p.grad.abs().sum() > 0
    assert s.features["s"].grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [{"gamma": 0.0}, {"gamma": -0.4}, {"order": 0}, {"order": 1.5}, {"order": True}, {"weight": -1.0},
     {"teacher_nodes": ["t", "u"]}],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict) -> None:
    args = {"student_nodes": ["s"], "teacher_nodes": ["t"], **kwargs}
    with pytest.raises(ConfigError):
        CCLoss(**args)
