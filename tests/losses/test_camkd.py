"""CA-MKD (Zhang et al. ICASSP 2022) against the authors' formula, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kd.errors import ConfigError
from kd.losses.camkd import CAMKDLoss, confidence_weights
from kd.outputs import DataInfo, ModelOutput


def test_the_teacher_that_predicts_the_label_best_weighs_most_on_that_sample() -> None:
    # two samples, three teachers; label 0 then 1
    z = [torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 4.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])]
    y = torch.tensor([0, 1])
    w = confidence_weights(z, y)  # (K, B)
    ce = torch.tensor([[-math.log(math.exp(4) / (math.exp(4) + 1)), math.log(2)],
                       [math.log(2), -math.log(math.exp(4) / (math.exp(4) + 1))],
                       [-math.log(math.e / (math.e + 1)), -math.log(1 / (math.e + 1))]])
    by_hand = (1 - torch.softmax(ce, dim=0)) / 2
    torch.testing.assert_close(w, by_hand)
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    assert w[:, 0].argmax() == 0 and w[:, 1].argmax() == 1


def test_the_loss_is_the_weighted_per_sample_kd_over_batch_and_teachers() -> None:
    g = torch.Generator().manual_seed(0)
    t, s, y = 4.0, torch.randn(5, 6, generator=g, requires_grad=True), torch.randint(0, 6, (5,), generator=g)
    z = [torch.randn(5, 6, generator=g) * 2 for _ in range(3)]
    teacher = ModelOutput(torch.zeros(5, 6), members={f"t{k}": ModelOutput(zk) for k, zk in enumerate(z)})
    loss = CAMKDLoss(temperature=t, weight=0.7, ce_weight=0.2)
    terms = loss(ModelOutput(s), teacher, {"target": y})
    w = confidence_weights(z, y)
    p_s = torch.softmax(s.detach() / t, 1)
    total = 0.0
    for k, zk in enumerate(z):
        p_t = torch.softmax(zk / t, 1)
        total = total + (w[k] * (p_t * (p_t.log() - p_s.log())).sum(1) * t * t).sum()
    torch.testing.assert_close(terms["kd"], 0.7 * total / (5 * 3))  # the authors divide by B * K
    torch.testing.assert_close(terms["ce"], 0.2 * torch.nn.functional.cross_entropy(s, y))
    with pytest.raises(ConfigError, match="ensemble"):
        loss.setup(ModelOutput(s), ModelOutput(z[0]), DataInfo(6, 5))


def test_one_teacher_becomes_three_seeds_of_it(make_cfg) -> None:
    from kd.training.prepare import prepare

    cfg = make_cfg("distill=camkd")
    job = prepare(cfg)
    assert list(job.teacher.members) == ["seed0", "seed1", "seed2"]
    assert {k: v.seed for k, v in cfg.teacher.recipes.items()} == {"seed0": 0, "seed1": 1, "seed2": 2}
    with pytest.raises(ConfigError) as e:
        prepare(make_cfg("distill=camkd", "teacher.ckpt=/x.pt"))
    assert e.value.key == "teacher.ckpt"
