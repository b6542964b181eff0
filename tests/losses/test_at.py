"""Attention transfer against values worked out by hand from the paper's formula."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd.errors import ConfigError
from kd.losses.at import ATLoss, at_loss, attention_map
from kd.outputs import DataInfo, ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf"


def _at_by_hand(f_s: list, f_t: list) -> float:
    """mean over samples and positions of (Q_s - Q_t)^2, Q = normalize(mean_c f^2), in plain Python."""
    def q(f: list) -> list[float]:  # f[c][h][w] -> flattened normalised map
        c, h, w = len(f), len(f[0]), len(f[0][0])
        m = [sum(f[k][i][j] ** 2 for k in range(c)) / c for i in range(h) for j in range(w)]
        n = math.sqrt(sum(v * v for v in m))
        return [v / n for v in m]

    total, count = 0.0, 0
    for a, b in zip(f_s, f_t):
        for x, y in zip(q(a), q(b)):
            total += (x - y) ** 2
            count += 1
    return total / count


def test_at_loss_matches_a_value_worked_by_hand() -> None:
    # Student channels [[1,0],[0,1]] and [[1,2],[0,1]]: mean_c f^2 = [1, 2, 0, 1], Q_s = that / sqrt(6).
    # Teacher: 3 channels of ones, Q_t = [1, 1, 1, 1] / 2. Both unit vectors, so
    # mean((Q_s - Q_t)^2) = (1 + 1 - 2 Q_s.Q_t) / 4 = (2 - 4 / sqrt(6)) / 4 = 1/2 - 1/sqrt(6).
    f_s = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    f_t = torch.ones(1, 3, 2, 2)
    expected = 0.5 - 1 / math.sqrt(6)
    assert at_loss(f_s, f_t).item() == pytest.approx(expected, abs=1e-7)
    assert _at_by_hand(f_s.tolist(), f_t.tolist()) == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(attention_map(f_s), torch.tensor([[1.0, 2.0, 0.0, 1.0]]) / math.sqrt(6))


def test_at_loss_matches_loops_on_random_maps_with_different_channels() -> None:
    torch.manual_seed(0)
    f_s, f_t = torch.randn(3, 4, 3, 3, dtype=torch.float64), torch.randn(3, 7, 3, 3, dtype=torch.float64)
    expected = _at_by_hand(f_s.tolist(), f_t.tolist())
    assert at_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-10)


def test_larger_map_is_average_pooled_to_the_smaller() -> None:
    torch.manual_seed(1)
    f_s, f_t = torch.rand(2, 3, 2, 2, dtype=torch.float64), torch.rand(2, 5, 4, 4, dtype=torch.float64)
    # 2x2 block means of the teacher, by loops
    pooled = [[[[sum(f_t[b, c, 2 * i + di, 2 * j + dj].item() for di in (0, 1) for dj in (0, 1)) / 4
                 for j in range(2)] for i in range(2)] for c in range(5)] for b in range(2)]
    expected = _at_by_hand(f_s.tolist(), pooled)
    assert at_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-10)
    assert at_loss(f_t, f_s).item() == pytest.approx(expected, rel=1e-10)  # symmetric in which is larger


def test_at_loss_is_zero_for_equal_or_rescaled_maps_and_positive_otherwise() -> None:
    torch.manual_seed(2)
    f = torch.rand(4, 3, 5, 5)
    assert at_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert at_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-12)  # the map is normalised
    assert at_loss(f, torch.rand(4, 3, 5, 5)).item() > 1e-5


def _outputs(s_feats: dict, t_feats: dict):
    torch.manual_seed(3)
    y = torch.tensor([0, 2])
    return ModelOutput(torch.randn(2, 3, requires_grad=True), s_feats), ModelOutput(torch.randn(2, 3), t_feats), y


def test_module_sums_pairs_weights_them_and_adds_ce() -> None:
    torch.manual_seed(4)
    s = {"a": torch.rand(2, 4, 8, 8, requires_grad=True), "b": torch.rand(2, 8, 4, 4, requires_grad=True)}
    t = {"A": torch.rand(2, 16, 8, 8, requires_grad=True), "B": torch.rand(2, 32, 2, 2, requires_grad=True)}
    student, teacher, y = _outputs(s, t)
    loss = ATLoss(["a", "b"], ["A", "B"])
    loss.setup(student, teacher, DataInfo(num_classes=3, num_samples=10))
    terms = loss(student, teacher, {"target": y})
    assert set(terms) == {"ce", "at"}
    expected = _at_by_hand(s["a"].tolist(), t["A"].tolist()) + at_loss(s["b"], t["B"]).item()
    assert terms["at"].item() == pytest.approx(1000.0 * expected, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(student.logits, y).item())
    sum(terms.values()).backward()
    assert s["a"].grad.abs().sum() > 0 and s["b"].grad.abs().sum() > 0 and student.logits.grad is not None
    assert t["A"].grad is None and t["B"].grad is None  # the teacher is detached


def test_half_precision_features_give_an_fp32_loss() -> None:
    torch.manual_seed(5)
    f_s, f_t = torch.rand(2, 4, 4, 4) * 30, torch.rand(2, 6, 4, 4) * 30
    low = at_loss(f_s.bfloat16(), f_t.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(at_loss(f_s.bfloat16().float(), f_t.bfloat16().float()).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"student_nodes": ["a", "b"], "teacher_nodes": ["A"]}, "student_nodes"),
        ({"student_nodes": [], "teacher_nodes": []}, "student_nodes"),
        ({"p": 0.0}, "p"),
        ({"p": -2.0}, "p"),
        ({"weight": -1.0}, "weight"),
        ({"ce_weight": -0.5}, "ce_weight"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["a"], "teacher_nodes": ["A"], **kwargs}
    with pytest.raises(ConfigError) as err:
        ATLoss(**args)
    assert err.value.key == key


def test_setup_rejects_embeddings() -> None:
    student = ModelOutput(torch.randn(2, 3), {"a": torch.randn(2, 16)})
    teacher = ModelOutput(torch.randn(2, 3), {"A": torch.randn(2, 8, 4, 4)})
    with pytest.raises(ConfigError, match="feature maps") as err:
        ATLoss(["a"], ["A"]).setup(student, teacher, DataInfo(3, 10))
    assert err.value.key == "student_nodes"


def test_config_builds_with_the_recipe_defaults() -> None:
    taps = OmegaConf.load(CONF / "model" / "student" / "digits_cnn.yaml")["_nodes_"]  # model/teacher=digits_cnn too
    model = {r: {"_nodes_": taps} for r in ("student", "teacher")}
    cfg = OmegaConf.create({"model": model, "distill": OmegaConf.load(CONF / "distill" / "at.yaml")})
    loss = instantiate(cfg.distill)
    assert isinstance(loss, ATLoss)
    assert loss.student_nodes == tuple(model["student"]["_nodes_"]["stages"])
    assert loss.weight(0) == 1000.0 and loss.ce_weight == 1.0 and loss.p == 2.0
