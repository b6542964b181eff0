"""KDCL (Guo et al. CVPR 2020): the MinLogit and Naive ensemble teachers, by hand."""

from __future__ import annotations

import pytest
import torch

from kd.errors import ConfigError
from kd.losses.kd import kd_loss
from kd.losses.kdcl import KDCLLoss, kdcl_teacher
from kd.outputs import ModelOutput


def test_minlogit_takes_each_class_at_its_least_likely_relative_to_the_label() -> None:
    a = torch.tensor([[3.0, 1.0, 0.0]])
    b = torch.tensor([[5.0, 4.0, -2.0]])
    y = torch.tensor([0])
    # a - a[y] = [0, -2, -3], b - b[y] = [0, -1, -7] -> min [0, -2, -7]
    torch.testing.assert_close(kdcl_teacher([a, b], y, "minlogit"), torch.tensor([[0.0, -2.0, -7.0]]))


def test_naive_takes_the_network_with_the_lowest_cross_entropy_per_sample() -> None:
    a = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    b = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(kdcl_teacher([a, b], y, "naive"), torch.stack([a[0], b[1]]))


def test_every_network_learns_from_the_detached_teacher_and_its_labels() -> None:
    g = torch.Generator().manual_seed(0)
    z = {n: torch.randn(4, 5, generator=g, requires_grad=True) for n in ("student", "p")}
    y = torch.tensor([0, 1, 2, 3])
    out = ModelOutput(z["student"], members={n: ModelOutput(v) for n, v in z.items()})
    terms = KDCLLoss(temperature=2.0, weight=0.5, ce_weight=0.3)(out, None, {"target": y})
    assert set(terms) == {"ce", "kd", "ce_p", "kd_p"}
    soft = kdcl_teacher(list(z.values()), y)
    for n, suffix in (("student", ""), ("p", "_p")):
        torch.testing.assert_close(terms[f"kd{suffix}"], 0.5 * kd_loss(z[n], soft, 2.0))
        torch.testing.assert_close(terms[f"ce{suffix}"], 0.3 * torch.nn.functional.cross_entropy(z[n], y))
    terms["kd_p"].backward()
    assert z["student"].grad is None  # the teacher carries no gradient into the other network
    with pytest.raises(ConfigError, match="minlogit, naive"):
        KDCLLoss(ensemble="mean")
