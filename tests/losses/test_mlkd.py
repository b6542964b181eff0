"""MLKD against its three alignments worked by hand, the authors' masks, and its defaults."""

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
from kd.losses.kd import kd_loss
from kd.losses.mlkd import (
    MLKDLoss,
    batch_correlation_loss,
    class_correlation_loss,
    confidence_masks,
    mlkd_loss,
)
from kd.outputs import ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf" / "distill" / "mlkd.yaml"


def _softmax(z: np.ndarray, T: float) -> np.ndarray:
    e = np.exp(z / T)
    return e / e.sum(1, keepdims=True)


def _mlkd_by_hand(s: np.ndarray, t: np.ndarray, temps: list[float]) -> tuple[float, float, float]:
    """The authors' weak-view terms with explicit loops: each level summed over the
    temperatures, times the fraction of samples (classes) the median masks keep."""
    b, c = s.shape
    p1 = _softmax(t, 1.0)
    conf, class_conf = p1.max(1), p1.sum(0)
    kept_s = float(np.mean(conf <= np.percentile(conf, 50)))
    kept_c = float(np.mean(class_conf <= np.percentile(class_conf, 50)))
    instance = batch = klass = 0.0
    for T in temps:
        ps, pt = _softmax(s, T), _softmax(t, T)
        instance += T**2 * sum(pt[i, j] * math.log(pt[i, j] / ps[i, j]) for i in range(b) for j in range(c)) / b
        gram = sum(
            (sum(pt[i, k] * pt[j, k] for k in range(c)) - sum(ps[i, k] * ps[j, k] for k in range(c))) ** 2
            for i in range(b) for j in range(b)
        )
        batch += gram / b
        corr = sum(
            (sum(pt[k, i] * pt[k, j] for k in range(b)) - sum(ps[k, i] * ps[k, j] for k in range(b))) ** 2
            for i in range(c) for j in range(c)
        )
        klass += corr / c
    return kept_s * instance, kept_s * batch, kept_c * klass


@pytest.mark.parametrize("shape", [(5, 4), (4, 6)])
def test_mlkd_matches_the_three_levels_worked_by_hand(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=shape) * 2, rng.normal(size=shape) * 3
    temps = [2.0, 3.0, 4.0, 5.0, 6.0]
    got = mlkd_loss(torch.tensor(s), torch.tensor(t), temps)
    for g, want in zip(got, _mlkd_by_hand(s, t, temps)):
        assert g.item() == pytest.approx(want, rel=1e-9)


def test_masks_keep_the_less_confident_half_of_samples_and_classes() -> None:
    # Teacher top-1 probabilities rise with the row; the median of 4 lies between rows 1 and 2.
    t = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    sample_mask, class_mask = confidence_masks(t)
    assert sample_mask.tolist() == [True, True, False, False]
    # Class 0 collects the most probability; classes 1 and 2 tie at the median and are both kept.
    assert class_mask.tolist() == [False, True, True]
    # An odd batch keeps the median sample itself (<=), so 3 of 5.
    sample_mask, _ = confidence_masks(torch.tensor([[float(i), 0.0] for i in range(5)]))
    assert sample_mask.tolist() == [True, True, True, False, False]


def test_masks_scale_the_terms_by_the_fraction_they_keep() -> None:
    # With 5 samples 3 are kept, with 3 classes 2: the released code multiplies each reduced
    # term by the mean of its boolean mask.
    torch.manual_seed(0)
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) * 3
    instance, batch, klass = mlkd_loss(s, t, [4.0])
    assert instance.item() == pytest.approx(3 / 5 * kd_loss(s, t, 4.0).item(), rel=1e-12)
    assert batch.item() == pytest.approx(3 / 5 * batch_correlation_loss(s, t, 4.0).item(), rel=1e-12)
    assert klass.item() == pytest.approx(2 / 3 * class_correlation_loss(s, t, 4.0).item(), rel=1e-12)


def test_mlkd_is_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    torch.manual_seed(1)
    z = torch.randn(8, 10) * 3
    for term in mlkd_loss(z, z.clone(), [2.0, 4.0]):
        assert term.item() == pytest.approx(0.0, abs=1e-6)
    # (Permuting the classes would leave the B x B sample correlations unchanged.)
    for term in mlkd_loss(torch.randn(8, 10) * 3, z, [2.0, 4.0]):
        assert term.item() > 1e-5


def test_mlkd_of_half_precision_logits_is_computed_in_fp32() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(8, 100) * 5, torch.randn(8, 100) * 5
    low = mlkd_loss(s.bfloat16(), t.bfloat16(), [2.0, 6.0])
    high = mlkd_loss(s.bfloat16().float(), t.bfloat16().float(), [2.0, 6.0])
    for a, b in zip(low, high):
        assert a.dtype == torch.float32
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_mlkd_under_bf16_autocast_keeps_its_correlation_products_in_fp32() -> None:
    # Autocast would run the Gram products in bf16; their difference for a student close to
    # the teacher would then be mostly rounding error.
    torch.manual_seed(5)
    t = torch.randn(64, 100) * 4
    s = t + 0.01 * torch.randn(64, 100)
    ref = mlkd_loss(s, t, [2.0, 4.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mlkd_loss(s, t, [2.0, 4.0])
    for a, b in zip(low, ref):
        assert a.dtype == torch.float32
        assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_module_returns_three_weighted_terms_and_ce() -> None:
    torch.manual_seed(3)
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    parts = mlkd_loss(s, t, [2.0, 3.0, 4.0, 5.0, 6.0])
    terms = MLKDLoss()(ModelOutput(s), ModelOutput(t), {"target": y})
    assert set(terms) == {"ce", "mlkd_instance", "mlkd_batch", "mlkd_class"}
    for name, part in zip(["mlkd_instance", "mlkd_batch", "mlkd_class"], parts):
        assert terms[name].item() == pytest.approx(0.9 * part.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.1 * F.cross_entropy(s, y).item(), rel=1e-6)


def test_gradients_reach_the_student_logits_and_never_the_teacher() -> None:
    torch.manual_seed(4)
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    terms = MLKDLoss()(ModelOutput(s), ModelOutput(t), {"target": torch.tensor([1, 2, 3, 4])})
    for name in ["mlkd_instance", "mlkd_batch", "mlkd_class"]:
        (grad,) = torch.autograd.grad(terms[name], s, retain_graph=True)
        assert grad.abs().sum() > 0, name
    sum(terms.values()).backward()
    assert t.grad is None


def test_config_is_the_authors_defaults_and_builds_from_a_yaml_list() -> None:
    loss = instantiate(OmegaConf.load(CONF))
    assert isinstance(loss, MLKDLoss)
    assert loss.temperatures == (2.0, 3.0, 4.0, 5.0, 6.0)
    assert (loss.weight(0), loss.ce_weight) == (0.9, 0.1)
    assert loss.requires_teacher and not loss.student_nodes and not loss.teacher_nodes


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"temperatures": []}, "temperatures"), ({"temperatures": 4.0}, "temperatures"),
     ({"temperatures": "4"}, "temperatures"), ({"temperatures": [2.0, 0.0]}, "temperatures[1]"),
     ({"temperatures": [-1.0]}, "temperatures[0]"), ({"weight": -0.9}, "weight"), ({"ce_weight": -0.1}, "ce_weight")],
)
def test_bad_hyperparameters_raise_config_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        MLKDLoss(**kwargs)
    assert err.value.key == key
