"""Neuron selectivity transfer against the MMD written out with loops over channel pairs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd.errors import ConfigError
from kd.losses.nst import NSTLoss, nst_loss
from kd.outputs import DataInfo, ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf"


def _mmd_by_hand(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    """Batch mean of MMD^2 with k(x, y) = (x.y)^2 over spatially L2-normalised channels, by loops."""
    def channels(f: list) -> list[list[float]]:  # f[c][h][w] -> one normalised vector per channel
        out = []
        for m in f:
            v = [x for row in m for x in row]
            n = math.sqrt(sum(x * x for x in v))
            out.append([x / n for x in v])
        return out

    def k(x: list[float], y: list[float]) -> float:
        return sum(a * b for a, b in zip(x, y)) ** 2

    def mean_k(xs: list, ys: list) -> float:
        return sum(k(x, y) for x in xs for y in ys) / (len(xs) * len(ys))

    total = 0.0
    for a, b in zip(f_s.tolist(), f_t.tolist()):
        s, t = channels(a), channels(b)
        total += mean_k(t, t) + mean_k(s, s) - 2 * mean_k(s, t)
    return total / f_s.shape[0]


def test_nst_loss_matches_a_value_worked_by_hand() -> None:
    # One student channel e1, teacher channels e1 and e2 (2x1 maps, unnormalised on purpose).
    # k(s,s) = 1; teacher pairs: 1, 0, 0, 1 -> mean 1/2; cross: 1, 0 -> mean 1/2.
    # MMD^2 = 1/2 + 1 - 2 * 1/2 = 1/2.
    f_s = torch.tensor([[[[3.0], [0.0]]]])  # (1, 1, 2, 1)
    f_t = torch.tensor([[[[2.0], [0.0]], [[0.0], [5.0]]]])  # (1, 2, 2, 1)
    assert nst_loss(f_s, f_t).item() == pytest.approx(0.5, abs=1e-7)
    assert _mmd_by_hand(f_s, f_t) == pytest.approx(0.5, abs=1e-12)


def test_nst_loss_matches_loops_with_different_channel_counts() -> None:
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 3, 2, 3, dtype=torch.float64), torch.randn(2, 5, 2, 3, dtype=torch.float64)
    assert nst_loss(f_s, f_t).item() == pytest.approx(_mmd_by_hand(f_s, f_t), rel=1e-10)


def test_larger_map_is_average_pooled_to_the_smaller() -> None:
    torch.manual_seed(1)
    f_s, f_t = torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.rand(2, 4, 2, 2, dtype=torch.float64)
    pooled = torch.tensor([[[[sum(f_s[b, c, 2 * i + di, 2 * j + dj].item() for di in (0, 1) for dj in (0, 1)) / 4
                              for j in range(2)] for i in range(2)] for c in range(3)] for b in range(2)],
                          dtype=torch.float64)
    assert nst_loss(f_s, f_t).item() == pytest.approx(_mmd_by_hand(pooled, f_t), rel=1e-10)


def test_nst_loss_is_zero_for_the_same_set_of_channels() -> None:
    torch.manual_seed(2)
    f = torch.rand(3, 4, 5, 5, dtype=torch.float64)
    assert nst_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-12)
    # MMD compares distributions of channels: order, per-channel scale and duplication do not matter
    shuffled = f[:, [2, 0, 3, 1]] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)[:, None, None]
    assert nst_loss(f, shuffled).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(f, torch.cat([f, f], dim=1)).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(f, torch.rand(3, 4, 5, 5, dtype=torch.float64)).item() > 1e-4


def test_module_sums_pairs_and_the_teacher_gets_no_gradient() -> None:
    torch.manual_seed(3)
    s = {"a": torch.rand(2, 4, 8, 8, requires_grad=True), "b": torch.rand(2, 8, 4, 4, requires_grad=True)}
    t = {"A": torch.rand(2, 16, 8, 8, requires_grad=True), "B": torch.rand(2, 32, 4, 4, requires_grad=True)}
    student = ModelOutput(torch.randn(2, 3, requires_grad=True), s)
    teacher = ModelOutput(torch.randn(2, 3), t)
    loss = NSTLoss(["a", "b"], ["A", "B"])
    loss.setup(student, teacher, DataInfo(num_classes=3, num_samples=10))
    terms = loss(student, teacher, {"target": torch.tensor([0, 2])})
    assert set(terms) == {"ce", "nst"}
    expected = _mmd_by_hand(s["a"].detach(), t["A"].detach()) + _mmd_by_hand(s["b"].detach(), t["B"].detach())
    assert terms["nst"].item() == pytest.approx(50.0 * expected, rel=1e-5)
    sum(terms.values()).backward()
    assert s["a"].grad.abs().sum() > 0 and s["b"].grad.abs().sum() > 0 and student.logits.grad is not None
    assert t["A"].grad is None and t["B"].grad is None


def test_half_precision_features_give_an_fp32_loss() -> None:
    torch.manual_seed(4)
    f_s, f_t = torch.rand(2, 4, 4, 4), torch.rand(2, 6, 4, 4)
    low = nst_loss(f_s.bfloat16(), f_t.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(nst_loss(f_s.bfloat16().float(), f_t.bfloat16().float()).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"student_nodes": ["a"], "teacher_nodes": ["A", "B"]}, "student_nodes"),
        ({"student_nodes": [], "teacher_nodes": []}, "student_nodes"),
        ({"student_nodes": [""], "teacher_nodes": ["A"]}, "student_nodes"),
        ({"weight": -50.0}, "weight"),
        ({"ce_weight": -1.0}, "ce_weight"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict, key: str) -> None:
    args = {"student_nodes": ["a"], "teacher_nodes": ["A"], **kwargs}
    with pytest.raises(ConfigError) as err:
        NSTLoss(**args)
    assert err.value.key == key


def test_setup_rejects_embeddings() -> None:
    student = ModelOutput(torch.randn(2, 3), {"a": torch.randn(2, 8, 4, 4)})
    teacher = ModelOutput(torch.randn(2, 3), {"A": torch.randn(2, 16)})
    with pytest.raises(ConfigError, match="feature maps") as err:
        NSTLoss(["a"], ["A"]).setup(student, teacher, DataInfo(3, 10))
    assert err.value.key == "teacher_nodes"


def test_config_builds_with_the_recipe_defaults() -> None:
    taps = OmegaConf.load(CONF / "model" / "student" / "digits_cnn.yaml")["_nodes_"]  # model/teacher=digits_cnn too
    model = {r: {"_nodes_": taps} for r in ("student", "teacher")}
    cfg = OmegaConf.create({"model": model, "distill": OmegaConf.load(CONF / "distill" / "nst.yaml")})
    loss = instantiate(cfg.distill)
    assert isinstance(loss, NSTLoss)
    assert loss.teacher_nodes == tuple(model["teacher"]["_nodes_"]["stages"])
    assert loss.weight(0) == 50.0 and loss.ce_weight == 1.0


def test_kernels_stay_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(5)
    f_s, f_t = torch.rand(8, 16, 4, 4), torch.rand(8, 32, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nst_loss(f_s, f_t)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(nst_loss(f_s, f_t).item(), rel=1e-6)


def test_repr_shows_the_kernel_pairs_and_weights() -> None:
    assert repr(NSTLoss(["a", "b"], ["c", "d"])) == "NSTLoss(kernel=(x.y)^2, pairs=2, ce_weight=1, weight=50)"
