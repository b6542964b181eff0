"""KD with logit standardisation against its formula, its invariances and the authors' defaults."""

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
from kd.losses.logit_std import LogitStandardKD, logit_standard_kd_loss, standardize
from kd.outputs import DataInfo, ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf" / "distill" / "kd_ls.yaml"


def _ls_kd_by_hand(s: np.ndarray, t: np.ndarray, T: float) -> float:
    total = 0.0
    for s_i, t_i in zip(s, t):
        n = len(s_i)
        z = []
        for v in (s_i, t_i):
            mean = sum(v) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))  # unbiased, as torch.std
            z.append([(x - mean) / (std + 1e-7) / T for x in v])
        p_s = [math.exp(x) / sum(math.exp(y) for y in z[0]) for x in z[0]]
        p_t = [math.exp(x) / sum(math.exp(y) for y in z[1]) for x in z[1]]
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    return T**2 * total / len(s)


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
def test_loss_matches_the_formula_worked_by_hand(T: float) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 6)) * 3 + 1, rng.normal(size=(4, 6)) * 7 - 2
    got = logit_standard_kd_loss(torch.tensor(s), torch.tensor(t), T)
    assert got.item() == pytest.approx(_ls_kd_by_hand(s, t, T), rel=1e-9)


def test_standardize_uses_the_unbiased_std_plus_1e_7() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    # mean 3, squared deviations 4 + 1 + 0 + 9 = 14, unbiased variance 14 / 3.
    want = (z - 3.0) / (math.sqrt(14 / 3) + 1e-7)
    torch.testing.assert_close(standardize(z), want, rtol=1e-12, atol=0.0)


def test_loss_is_invariant_to_shifting_and_scaling_the_student_logits_per_sample() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64) * 4
    scale = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1  # (B, 1), positive
    shift = torch.randn(6, 1, dtype=torch.float64) * 50  # (B, 1)
    base = logit_standard_kd_loss(s, t, 2.0).item()
    assert base > 1e-3
    assert logit_standard_kd_loss(scale * s + shift, t, 2.0).item() == pytest.approx(base, rel=1e-6)
    assert logit_standard_kd_loss(s, scale * t + shift, 2.0).item() == pytest.approx(base, rel=1e-6)


def test_loss_is_zero_when_student_logits_are_a_positive_affine_map_of_the_teachers() -> None:
    torch.manual_seed(1)
    t = torch.randn(5, 10, dtype=torch.float64) * 5
    s = torch.rand(5, 1, dtype=torch.float64) * 0.2 * t + torch.randn(5, 1, dtype=torch.float64)
    assert logit_standard_kd_loss(s, t, 2.0).item() == pytest.approx(0.0, abs=1e-10)
    assert logit_standard_kd_loss(-s, t, 2.0).item() > 1.0  # a negative scale reverses the ranking


def test_loss_of_half_precision_logits_is_computed_in_fp32() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(4, 100) * 5, torch.randn(4, 100) * 5
    low = logit_standard_kd_loss(s.bfloat16(), t.bfloat16(), 2.0)
    assert low.dtype == torch.float32
    high = logit_standard_kd_loss(s.bfloat16().float(), t.bfloat16().float(), 2.0)
    assert low.item() == pytest.approx(high.item(), rel=1e-6)


def test_module_weights_the_kd_term_and_adds_ce() -> None:
    torch.manual_seed(3)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    loss = LogitStandardKD(temperature=2.0, weight=9.0, ce_weight=0.1)
    terms = loss(ModelOutput(s), ModelOutput(t), {"target": y})
    assert set(terms) == {"ce", "kd"}
    assert terms["kd"].item() == pytest.approx(9.0 * logit_standard_kd_loss(s, t, 2.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-6)


def test_gradients_reach_the_student_logits_and_never_the_teacher() -> None:
    torch.manual_seed(4)
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    LogitStandardKD()(ModelOutput(s), ModelOutput(t), {"target": torch.tensor([1, 2, 3, 4])})["kd"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_config_is_the_authors_cifar_command() -> None:
    loss = instantiate(OmegaConf.load(CONF))
    assert isinstance(loss, LogitStandardKD)
    assert (loss.temperature, loss.weight(0), loss.ce_weight) == (2.0, 9.0, 0.1)
    assert loss.requires_teacher and not loss.student_nodes and not loss.teacher_nodes


def test_setup_refuses_different_or_single_classes() -> None:
    loss = LogitStandardKD()
    loss.setup(ModelOutput(torch.zeros(2, 10)), ModelOutput(torch.zeros(2, 10)), DataInfo(10, 100))
    for s_classes, t_classes in [(10, 100), (1, 1)]:
        with pytest.raises(ConfigError, match="same"):
            s, t = ModelOutput(torch.zeros(2, s_classes)), ModelOutput(torch.zeros(2, t_classes))
            loss.setup(s, t, DataInfo(10, 100))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"temperature": 0.0}, "temperature"), ({"temperature": -2.0}, "temperature"),
     ({"temperature": "2"}, "temperature"), ({"weight": -9.0}, "weight"), ({"ce_weight": float("inf")}, "ce_weight")],
)
def test_bad_hyperparameters_raise_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        LogitStandardKD(**kwargs)
    assert err.value.key == key
