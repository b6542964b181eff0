"""Similarity-preserving KD against Gram matrices computed by explicit loops."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd.errors import ConfigError
from kd.losses.sp import SPLoss, similarity_matrix, sp_loss
from kd.outputs import ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf"


def _gram_by_hand(q: list[list[float]]) -> list[list[float]]:
    """normalize_rows(Q Q^T) with loops."""
    b = len(q)
    g = [[sum(x * y for x, y in zip(q[i], q[j])) for j in range(b)] for i in range(b)]
    return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in g]


def _sp_by_hand(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    b = f_s.shape[0]
    g_s = _gram_by_hand(f_s.reshape(b, -1).tolist())
    g_t = _gram_by_hand(f_t.reshape(b, -1).tolist())
    return sum((g_t[i][j] - g_s[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_loss_matches_a_value_worked_by_hand() -> None:
    # Q_s = I: G_s = I. Q_t = all ones: Q Q^T = 2 everywhere, rows normalised to 1/sqrt(2).
    # ||G_t - G_s||_F^2 = 2 (1/sqrt(2) - 1)^2 + 2 (1/2) = 4 - 2 sqrt(2); divided by B^2 = 4.
    f_s, f_t = torch.eye(2), torch.ones(2, 2)
    expected = (4 - 2 * math.sqrt(2)) / 4
    assert sp_loss(f_s, f_t).item() == pytest.approx(expected, abs=1e-7)
    assert _sp_by_hand(f_s, f_t) == pytest.approx(expected, abs=1e-12)


def test_sp_loss_matches_loops_for_maps_and_embeddings_of_any_size() -> None:
    torch.manual_seed(0)
    f_s = torch.randn(4, 3, 2, 2, dtype=torch.float64)  # student map
    f_t = torch.randn(4, 7, dtype=torch.float64)  # teacher embedding: only B must agree
    assert sp_loss(f_s, f_t).item() == pytest.approx(_sp_by_hand(f_s, f_t), rel=1e-10)
    g = similarity_matrix(f_s)
    torch.testing.assert_close(g, torch.tensor(_gram_by_hand(f_s.reshape(4, -1).tolist()), dtype=torch.float64))


def test_sp_loss_is_zero_for_equal_or_rescaled_features_and_positive_otherwise() -> None:
    torch.manual_seed(1)
    f = torch.randn(5, 4, 3, 3)
    assert sp_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert sp_loss(f, 4.0 * f).item() == pytest.approx(0.0, abs=1e-10)  # rows are normalised
    assert sp_loss(f, torch.randn(5, 4, 3, 3)).item() > 1e-4


def _outputs(s_feats: dict, t_feats: dict):
    torch.manual_seed(2)
    return ModelOutput(torch.randn(3, 4, requires_grad=True), s_feats), ModelOutput(torch.randn(3, 4), t_feats)


def test_last_only_reads_the_last_pair_and_weights_it() -> None:
    torch.manual_seed(3)
    s = {"s1": torch.randn(3, 2, 4, 4), "s2": torch.randn(3, 4, 2, 2, requires_grad=True)}
    t = {"t1": torch.randn(3, 8, 4, 4), "t2": torch.randn(3, 16, 2, 2, requires_grad=True),
         "t3": torch.randn(3, 5)}
    student, teacher = _outputs(s, t)
    loss = SPLoss(["s1", "s2"], ["t1", "t2", "t3"])  # unequal lengths are fine: only the last ones count
    assert loss.student_nodes == ("s2",) and loss.teacher_nodes == ("t3",)
    terms = loss(student, teacher, {"target": torch.tensor([0, 1, 3])})
    assert set(terms) == {"ce", "sp"}
    assert terms["sp"].item() == pytest.approx(3000.0 * _sp_by_hand(s["s2"].detach(), t["t3"]), rel=1e-5)
    sum(terms.values()).backward()
    assert s["s2"].grad.abs().sum() > 0 and student.logits.grad is not None
    assert t["t2"].grad is None


def test_all_pairs_are_summed_without_last_only() -> None:
    torch.manual_seed(4)
    s = {"s1": torch.randn(3, 2, 4, 4), "s2": torch.randn(3, 4, 2, 2)}
    t = {"t1": torch.randn(3, 8, 4, 4, requires_grad=True), "t2": torch.randn(3, 16, 1, 1)}
    student, teacher = _outputs(s, t)
    terms = SPLoss(["s1", "s2"], ["t1", "t2"], last_only=False, weight=1.0, ce_weight=0.0)(
        student, teacher, {"target": torch.tensor([0, 1, 3])}
    )
    assert set(terms) == {"sp"}
    expected = _sp_by_hand(s["s1"], t["t1"].detach()) + _sp_by_hand(s["s2"], t["t2"])
    assert terms["sp"].item() == pytest.approx(expected, rel=1e-5)
    assert not terms["sp"].requires_grad  # the teacher is detached and the student has no grad here


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"student_nodes": ["a", "b"], "teacher_nodes": ["A"], "last_only": False}, "student_nodes"),
        ({"student_nodes": [], "teacher_nodes": ["A"]}, "student_nodes"),
        ({"last_only": "yes"}, "last_only"),
        ({"weight": -1.0}, "weight"),
        ({"ce_weight": float("nan")}, "ce_weight"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["a"], "teacher_nodes": ["A"], **kwargs}
    with pytest.raises(ConfigError) as err:
        SPLoss(**args)
    assert err.value.key == key


def test_config_builds_with_the_recipe_defaults() -> None:
    taps = OmegaConf.load(CONF / "model" / "student" / "digits_cnn.yaml")["_nodes_"]  # model/teacher=digits_cnn too
    model = {r: {"_nodes_": taps} for r in ("student", "teacher")}
    cfg = OmegaConf.create({"model": model, "distill": OmegaConf.load(CONF / "distill" / "sp.yaml")})
    loss = instantiate(cfg.distill)
    assert isinstance(loss, SPLoss) and loss.last_only
    assert loss.student_nodes == (model["student"]["_nodes_"]["stages"][-1],)
    assert loss.teacher_nodes == (model["teacher"]["_nodes_"]["stages"][-1],)
    assert loss.weight(0) == 3000.0 and loss.ce_weight == 1.0


def test_gram_matrices_stay_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(5)
    f_s, f_t = torch.rand(8, 16, 4, 4), torch.rand(8, 32, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sp_loss(f_s, f_t)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(sp_loss(f_s, f_t).item(), rel=1e-6)
