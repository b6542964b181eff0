"""CTKD against the authors' code: the temperature module, its gradient reversal, the curriculum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.errors import ConfigError
from kd.losses.ctkd import CTKDLoss, curriculum
from kd.outputs import ModelOutput


# --- zhengli97/CTKD (models/temp_global.py, train_student.py, distiller_zoo/KD.py), as released ---
class _GradientReversalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        return grads.new_tensor(ctx.lambda_) * grads, None


class _GlobalT(nn.Module):
    def __init__(self):
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)

    def forward(self, fake_input1, fake_input2, lambda_):
        return _GradientReversalFunction.apply(self.global_T, lambda_)


class _CosineDecay:
    def __init__(self, max_value, min_value, num_loops):
        self._max_value, self._min_value, self._num_loops = max_value, min_value, num_loops

    def get_value(self, i):
        i = min(max(i, 0), self._num_loops)
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        return value * (self._max_value - self._min_value) + self._min_value


def _distill_kl(y_s, y_t, T):
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1)) * T * T
# --- end of the authors' code ---


def test_the_curriculum_is_the_authors_cosine_decay() -> None:
    theirs = _CosineDecay(max_value=0, min_value=-1, num_loops=10)  # scripts/run_cifar_distill.sh
    for epoch in range(1, 20):
        assert curriculum(epoch, 10, 0.0, -1.0) == pytest.approx(theirs.get_value(epoch), abs=1e-12)
    assert curriculum(5, 10, 0.0, -1.0) == pytest.approx(-0.5) and curriculum(10, 10, 0.0, -1.0) == -1.0


@pytest.mark.parametrize("epoch", [0, 4, 30])  # kd's 0-based epoch e is the authors' epoch e + 1
def test_loss_and_every_gradient_equal_the_authors(epoch: int) -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 10, dtype=torch.float64) * 3, torch.randn(8, 10, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (8,))
    ours = CTKDLoss().double()
    s1 = s.clone().requires_grad_(True)
    terms = ours(ModelOutput(s1, {}), ModelOutput(t, {}), {"target": y}, epoch=epoch)
    sum(terms.values()).backward()

    mlp, lam = _GlobalT().double(), _CosineDecay(0, -1, 10).get_value(epoch + 1)
    s2 = s.clone().requires_grad_(True)
    temp = 1 + 20 * torch.sigmoid(mlp(t, s2, lam))  # helper/loops.py: t_start + t_end * sigmoid
    want = 0.1 * F.cross_entropy(s2, y) + 0.9 * _distill_kl(s2, t, temp)
    want.backward()
    assert sum(terms.values()).item() == pytest.approx(want.item(), rel=1e-6)  # kd's CE is fp32
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)
    assert ours.theta.grad.item() == pytest.approx(mlp.global_T.grad.item(), rel=1e-7, abs=1e-12)
    if epoch >= 9:  # full reversal: the temperature climbs the loss the student descends
        free = CTKDLoss(lambda_max=1.0, lambda_min=1.0).double()
        free(ModelOutput(s, {}), ModelOutput(t, {}), {"target": y}, epoch=epoch)["ctkd"].backward()
        assert ours.theta.grad.item() == pytest.approx(-free.theta.grad.item(), rel=1e-5)


def test_the_temperature_starts_at_15_62_and_stays_in_its_range() -> None:
    loss = CTKDLoss()
    assert loss.temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 15.62
    with torch.no_grad():
        loss.theta.fill_(50.0)
    assert loss.temperature().item() == pytest.approx(21.0)
    assert [p for p in loss.parameters()] == [loss.theta]  # trained by the run's optimizer with the student


@pytest.mark.parametrize(("kwargs", "key"), [({"t_range": 0.0}, "t_range"), ({"lambda_epochs": 0}, "lambda_epochs"),
                                             ({"lambda_max": -2.0}, "lambda_max")])
def test_bad_settings_are_one_line(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        CTKDLoss(**kwargs)
    assert e.value.key == key
